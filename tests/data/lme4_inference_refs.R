# Reference numbers for tests/test_inference_outputs.py (lme4 1.1-31).
# Run: Rscript tests/data/lme4_inference_refs.R  (from the repository root)
suppressMessages(library(lme4))
options(digits = 12)
ss <- read.csv("torchmix/datasets/sleepstudy.csv")
ss$Subject <- factor(ss$Subject)
m1 <- lmer(Reaction ~ Days + (1 + Days | Subject), ss, REML = FALSE)
cat("sleepstudy (1+Days|Subject) ML\n")
print(sqrt(diag(as.matrix(vcov(m1)))))
print(as.matrix(vcov(m1)))
print(logLik(m1)); print(AIC(m1)); print(BIC(m1)); print(deviance(m1))
m0 <- lmer(Reaction ~ Days + (1 | Subject), ss, REML = FALSE)
cat("sleepstudy (1|Subject) ML\n")
print(logLik(m0)); print(AIC(m0)); print(BIC(m0))
print(anova(m0, m1))
print(VarCorr(m1), comp = c("Variance", "Std.Dev."))
print(as.data.frame(VarCorr(m1)))
ct <- read.csv("torchmix/datasets/contraception.csv")
ct$district <- factor(ct$district)
g1 <- glmer(use01 ~ age + urban + (1 | district), ct, family = binomial, nAGQ = 13)
cat("contraception use01 ~ age + urban + (1|district), nAGQ = 13\n")
print(fixef(g1)); print(logLik(g1)); print(VarCorr(g1)$district[1, 1])
print(sqrt(diag(as.matrix(vcov(g1)))))
print(as.matrix(vcov(g1)))
print(AIC(g1)); print(BIC(g1))

# lme4's default bobyqa stops slightly short of the optimum for m1 (its theta differs from the
# optimum in the 5th digit and vcov's intercept SE by 2e-5 relative); a tight refit:
m2 <- lmer(Reaction ~ Days + (1 + Days | Subject), ss, REML = FALSE,
           control = lmerControl(optimizer = "bobyqa", optCtrl = list(rhoend = 1e-12, maxfun = 1e5)))
cat("sleepstudy (1+Days|Subject) ML, tight optimiser\n")
print(logLik(m2), digits = 15)
print(sqrt(diag(as.matrix(vcov(m2)))))
print(as.data.frame(VarCorr(m2)))

cat("distribution functions\n")
print(c(qt(0.975, 17), pt(-2, 5), qnorm(0.975), qt(0.975, 2.5), qt(0.999999, 3), pt(1.3, 3.7),
        qt(0.995, 123.4), 2 * pt(-6.771485, 17), pt(-40, 3), qt(1e-10, 7)))

cat("Barnard-Rubin example: K = 3 estimates 1.0, 1.2, 1.4, SE 0.1 each, complete-data df 20\n")
K <- 3; est <- c(1.0, 1.2, 1.4); U <- 0.1^2; B <- var(est); Tt <- U + (1 + 1/K) * B
lambda <- (1 + 1/K) * B / Tt; nu_old <- (K - 1) / lambda^2; nuc <- 20
nu_obs <- (nuc + 1) / (nuc + 3) * nuc * (1 - lambda); nu <- 1 / (1 / nu_old + 1 / nu_obs)
print(c(Tt, nu, qt(0.975, nu), 2 * pt(-mean(est) / sqrt(Tt), nu)))

cat("sleepstudy logit y = Reaction > 300, y ~ Days + (1|Subject), nAGQ = 13\n")
ss$y <- as.numeric(ss$Reaction > 300)
g2 <- glmer(y ~ Days + (1 | Subject), ss, family = binomial, nAGQ = 13)
print(logLik(g2)); print(sqrt(diag(as.matrix(vcov(g2))))); print(AIC(g2)); print(BIC(g2))
