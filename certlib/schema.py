"""The result rows, defined once: the columns of every Parquet shard and the Hive partition
columns of the layout ``method=<m>/training=<t>/sigma=<s>/seed=<k>/``. The README documents
each column."""

import pyarrow as pa

# The configuration of a row; these columns live in the directory names, not in the files.
PARTITION_SCHEMA = pa.schema([("method", pa.string()), ("training", pa.string()), ("sigma", pa.float64()), ("seed", pa.int64())])
CONFIG = tuple(PARTITION_SCHEMA.names)

# The row schema (partition columns method, training, sigma, seed live in the path).
ROW_SCHEMA = pa.schema([
    pa.field("job_id", pa.string()),
    pa.field("unit_id", pa.string()),
    pa.field("dataset", pa.string()),
    pa.field("split", pa.string()),
    pa.field("index", pa.int64()),  # the image's index in the dataset's official order
    pa.field("label", pa.int64()),
    pa.field("lambda", pa.float64()),  # effective lambda (DSSN: L/(2q)); null for Gaussian/Laplace
    pa.field("noise_scale", pa.float64()),  # sigma for Gaussian, b for Laplace, lambda otherwise
    pa.field("levels", pa.int64()),  # DSSN: L; null otherwise
    pa.field("q", pa.int64()),
    pa.field("n0", pa.int64()),  # Monte Carlo only
    pa.field("n", pa.int64()),
    pa.field("alpha", pa.float64()),
    pa.field("certificate", pa.string()),  # dssn_exact | binary | multiclass
    pa.field("selected", pa.int64()),  # DSSN: the prediction; Monte Carlo: the n0 samples' class
    pa.field("prediction", pa.int64()),  # -1 = abstain
    pa.field("correct", pa.bool_()),  # prediction == label
    pa.field("votes", pa.list_(pa.int64())),  # DSSN: votes over all L offsets; MC: counts of the n samples
    pa.field("selection_votes", pa.list_(pa.int64())),  # MC: counts of the n0 samples; null for DSSN
    pa.field("p_a_lower", pa.float64()),
    pa.field("p_b_upper", pa.float64()),
    pa.field("radius_l1", pa.float64()),  # NaN where abstaining or not an L1 certificate
    pa.field("radius_l2", pa.float64()),
    pa.field("seconds", pa.float64()),  # certification time per image (unit wall time / images)
    pa.field("precision", pa.string()),
    pa.field("batch_size", pa.int64()),
    pa.field("worker_host", pa.string()),
    pa.field("device", pa.string()),
    pa.field("model_sha256", pa.string()),
    pa.field("library_version", pa.string()),
])
