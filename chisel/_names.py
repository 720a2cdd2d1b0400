"""Names of files, tensor-key prefixes and metadata keys, in one place (the step record's fields are
the typed `chisel.capture.step_record.StepRecord`)."""

from __future__ import annotations

# 3: step and keyframe files carry CRC32 checksums (CHECKSUM_KEY); 2 is read without verification
FORMAT_VERSION = 3
CHECKSUMS_SINCE = 3
OLDEST_READABLE_VERSION = 2  # version 1 stored one tensor per parameter

# files and folders of a run directory
MANIFEST = "manifest.json"
STEPS_DIR = "steps"
KEYFRAMES_DIR = "keyframes"
RANKS_DIR = "ranks"  # a DDP run: ranks/<r>/steps/<step>.safetensors, rank r ≥ 1's factors and tags
STEP_DIGITS = 9
TMP_PREFIX = ".tmp-"

# tensor-key prefixes inside the safetensors files
# θ after the step and gradients are flat vectors, one per parameter dtype: after/float32 …
AFTER = "after/"  # θ after the step, exact (param dtype)
DELTA = "delta/"  # θ_{t+1} − θ̂_t in the storage dtype (lossy modes, error fed back)
GRAD = "grad/"  # the gradient the optimizer consumed
TAG = "tag/"  # per-sample tag arrays
STATE = "state/"  # optimizer state: state/<key>/<param>
PARAM = "param/"  # θ in a keyframe
# per-sample factors are packed into one flat vector per dtype ("factors/<dtype>"); the step record's
# "factor_layout" maps each key X/<module>/<call> (layer input) or G/<module>/<call> (output
# gradient) to [dtype, offset, shape]
FACTORS = "factors/"
FACTOR_X = "X/"
FACTOR_G = "G/"

# the safetensors metadata key holding a step's JSON record
RECORD_KEY = "record"
# the safetensors metadata key holding the checksums: {"algorithm", "record", "tensors": {key: crc}}
CHECKSUM_KEY = "checksums"
CHECKSUM_ALGORITHM = "crc32"

# parameter encodings in a step file
EXACT = "after"
LOSSY = "delta"
# compact runs (chisel/store/compact.py): rank-r factors of the update, or θ after the step exactly,
# packed under "compact/"; the step record's "compact" field holds the measured errors
LOWRANK = "lowrank"
COMPACT_EXACT = "compact-exact"
COMPACT = "compact/"
