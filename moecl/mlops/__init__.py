"""The MLOps side of moecl: what the pipeline's steps do around the model.

`validation` (Great Expectations checks of a task folder), `versioning` (DVC data versions),
`steps` (each pipeline step as plain Python, which the KFP components call), `trainjob` (multi-node
training as a Kubeflow TrainJob), `registry` (MLflow runs, the registered model and its aliases),
`gate` (the promotion rule), `lifecycle` and `trigger` (one run per data version, retried when
lost), `loopback` (MLflow processes for tests and benchmarks). The MoE-CL model, its training and
its metrics live one level up, in `moecl`, and never import from here.
"""
