"""prefixtune: prefix-tuning for Hugging Face transformers, through the attention interface.

The public verbs:

    model = prefixtune.attach(base, prefixtune.PrefixConfig(num_virtual_tokens=20), name="e2e")
    model(input_ids=..., labels=..., adapter_names=["e2e", "__base__"])
    model.save_adapter("out/e2e")
    model = prefixtune.load_adapter(base, "out/e2e")
"""

from .errors import PrefixTuneError
from .model import BASE, PrefixModel, attach, load_adapter
from .prefix import PrefixConfig

__all__ = ["BASE", "PrefixConfig", "PrefixModel", "PrefixTuneError", "attach", "load_adapter"]
__version__ = "0.1.0"
