"""Everything that imports Ray: the cluster, Ray Data jobs (label, evaluate), Ray Train (train_job),
submit, and `plabel run` as declared stages (stages) run by one runner (runner)."""
