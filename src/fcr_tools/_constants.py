"""Registry and minibatch keys used across fcr_tools (never modified at run time)."""

from scvi import REGISTRY_KEYS

X_KEY = REGISTRY_KEYS.X_KEY
COVARIATES_KEY = REGISTRY_KEYS.CAT_COVS_KEY
TREATMENT_KEY = "treatment"

# added to each minibatch by fcr_tools' data loader
TREATMENT_IDX_KEY = "treatment_idx"
TREATMENT_DOSE_KEY = "treatment_dose"
CONTROL_X_KEY = "control_X"

LATENT_BLOCKS = ("x", "t", "tx")

# cells checked, encoded or grouped at a time in setup and pairing (bounded transient memory)
CHUNK_CELLS = 2**16
