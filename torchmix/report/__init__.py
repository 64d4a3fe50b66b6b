"""What a person reads: the call line, HTML rendering, the interface results share; inference on
fitted models (reference distributions, intervals, p-values, which standard errors, variance-component
tables, boundary diagnosis, model comparison and Wald tests)."""
