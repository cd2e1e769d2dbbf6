"""Typed config schema (`schema.py`), strict YAML loading and dotted overrides (`loader.py`), and the YAML files."""
from configs.loader import ConfigError, apply_overrides, config_from_dict, config_to_dict, dump_config, load_config
from configs.schema import Config

__all__ = ["Config", "ConfigError", "apply_overrides", "config_from_dict", "config_to_dict", "dump_config",
           "load_config"]
