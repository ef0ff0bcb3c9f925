"""The client side of a sweep: submitting it (``submission``), Ray's Job Submission API
(``jobs``) and the embedded local Ray instance (``local_ray``). Imports neither torch nor the
job's code, so ``certify status`` starts fast."""
