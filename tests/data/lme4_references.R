# Reference numbers for test_ranef_se.py and test_offsets.py (lme4, unit weights, ML).
# Run from this folder: Rscript lme4_references.R > lme4_references.txt
suppressMessages(library(lme4))
options(digits = 12)
cat("lme4", as.character(packageVersion("lme4")), "\n")

# 1. sleepstudy random slopes: conditional SDs of the random effects (condVar)
m <- lmer(Reaction ~ Days + (1 + Days | Subject), sleepstudy, REML = FALSE)
r <- ranef(m, condVar = TRUE)
pv <- attr(r$Subject, "postVar")
cat("## sleepstudy_slopes\n")
cat("subject,b_int,b_days,sd_int,sd_days,cov\n")
for (i in seq_len(nrow(r$Subject))) {
  cat(rownames(r$Subject)[i], r$Subject[i, 1], r$Subject[i, 2], sqrt(pv[1, 1, i]), sqrt(pv[2, 2, i]),
      pv[1, 2, i], sep = ",")
  cat("\n")
}

# 2. three levels: Subjects nested in four Groups (the grouping of reference (d)), unit weights
s <- sleepstudy
s$Group <- "1"
s$Group[s$Subject %in% c("309", "310", "335", "349")] <- "2"
s$Group[s$Subject %in% c("330", "337", "352", "369")] <- "3"
s$Group[s$Subject %in% c("331", "332", "334", "372")] <- "4"
m3 <- lmer(Reaction ~ Days + (1 | Group / Subject), s, REML = FALSE)
r3 <- ranef(m3, condVar = TRUE)
cat("## three_level_subject\n")
cat("id,b,sd\n")
ss <- r3[["Subject:Group"]]
for (i in seq_len(nrow(ss))) {
  cat(rownames(ss)[i], ss[i, 1], sqrt(attr(ss, "postVar")[1, 1, i]), sep = ",")
  cat("\n")
}
cat("## three_level_group\n")
cat("id,b,sd\n")
gg <- r3[["Group"]]
for (i in seq_len(nrow(gg))) {
  cat(rownames(gg)[i], gg[i, 1], sqrt(attr(gg, "postVar")[1, 1, i]), sep = ",")
  cat("\n")
}
cat("## three_level_fit\n")
cat("lnl", as.numeric(logLik(m3)), "\n")

# 3. poisson rate model with an offset
d <- read.csv("poisson_offset.csv")
mp <- glmer(y ~ x + (1 | g) + offset(log(n)), family = poisson, data = d, nAGQ = 13,
            control = glmerControl(optimizer = "bobyqa", optCtrl = list(maxfun = 1e5)))
cat("## poisson_offset\n")
cat("lnl", as.numeric(logLik(mp)), "\n")
cat("beta", fixef(mp), "\n")
cat("var", as.numeric(VarCorr(mp)$g), "\n")
cat("pred_first3", predict(mp)[1:3], "\n")
