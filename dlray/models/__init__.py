"""Model families: one file each, ending in `FAMILY = ModelFamily(...)` (dlray.models.family says
what each field means); `FAMILIES` maps their names to them. Models know nothing of Ray or of dlray.data.

Adding a family: one file here, one line in FAMILIES, one jobs/debug/<family>_cpu.yaml; the config
checks, the loop, export and the generic tests (tests/test_strategies.py's matrix) derive from the spec.
"""

from dlray.models import bert, cnn, diffusion, gan, gpt, rnn, vae, vit
from dlray.models.family import ModelFamily

FAMILIES: dict[str, ModelFamily] = {module.FAMILY.name: module.FAMILY for module in (cnn, diffusion, vae, gan, gpt, vit, bert, rnn)}
