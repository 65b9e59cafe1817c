"""The two code files of an export (``configuration_moce.py``, ``modeling_moce.py``): a few
lines each that build the classes of :mod:`.hf_native` through the stable path
:mod:`moce_plugin.hf`. Imports nothing, so both the exporter and a loaded model's
``save_pretrained`` can write them."""

#: What exported remote code imports: :mod:`moce_plugin.hf`, the path kept stable because the
#: files stay on disk and on the Hub long after the package that wrote them.
REMOTE_CODE_MODULE = "moce_plugin.hf"

# Both remote-code files import their class factory from the installed package and fail with
# this message when it is missing.
_IMPORT_OR_EXPLAIN = '''try:
    from ''' + REMOTE_CODE_MODULE + ''' import {name}
except ImportError as exc:  # the classes live in the package, versioned with it
    raise ImportError(
        "This model is a MoCE (Mixture-of-Clustered-Experts) model: its code is in the "
        "moce-plugin package. Run `pip install moce-plugin`, then load it again with "
        "trust_remote_code=True."
    ) from exc
'''

CONFIG_CODE = ('''"""MoCE (moce-plugin) configuration; base family: {base}. Needs `pip install moce-plugin`."""

''' + _IMPORT_OR_EXPLAIN.replace("{name}", "moce_config_class") + '''
MoCEConfig = moce_config_class("{base}")
''')

MODELING_CODE = ('''"""MoCE (moce-plugin) model; base family: {base}. Needs `pip install moce-plugin`."""

from .configuration_moce import MoCEConfig

''' + _IMPORT_OR_EXPLAIN.replace("{name}", "moce_causal_lm_class") + '''
MoCEForCausalLM = moce_causal_lm_class(MoCEConfig)
''')
