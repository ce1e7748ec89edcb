"""Workflow configuration: the JSON schema shipped in the package, defaults, validation."""

from __future__ import annotations

from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

SCHEMA_NAME = "config.schema.yaml"


def schema_path() -> Path:
    """Filesystem path of the schema (for ``snakemake.utils.validate``)."""
    return Path(str(resources.files("qmriflow") / "schemas" / SCHEMA_NAME))


def load_schema() -> dict[str, Any]:
    return yaml.safe_load(schema_path().read_text())


def _key_path(err: Any) -> str:
    parts = [str(p) for p in err.absolute_path]
    if err.validator == "additionalProperties":
        extra = sorted(set(err.instance) - set(err.schema.get("properties", {})))
        parts.append(",".join(extra))
    return ".".join(parts) or "(top level)"


def validate_config(config: Mapping[str, Any], set_defaults: bool = True) -> dict[str, Any]:
    """Validate ``config`` against the schema, filling defaults; raise :class:`ConfigError`.

    The message names the offending key, e.g. ``config key physics.te_correction.tse: 'x' is
    not of type 'number'`` or ``config key physics.tse_correction: unknown key``.
    """
    import jsonschema

    cfg = dict(config)
    schema = load_schema()
    cls = jsonschema.validators.validator_for(schema)
    if set_defaults:
        cls = _extend_with_default(cls)
    validator = cls(schema)
    errors = sorted(validator.iter_errors(cfg), key=lambda e: list(e.absolute_path))
    if errors:
        e = errors[0]
        if e.validator == "additionalProperties":
            raise ConfigError(f"config key {_key_path(e)}: unknown key ({e.message})")
        raise ConfigError(f"config key {_key_path(e)}: {e.message}")
    if set_defaults:
        cfg["containers"] = container_images(cfg.get("containers", {}))
    return cfg


#: registry of the published images; the tag is the package version
IMAGE_REGISTRY = "docker://ghcr.io/qmriflow"


def container_images(containers: Mapping[str, Any]) -> dict[str, str]:
    """Image reference per rule group: the configured one, or (empty) the image of this
    package version, ``docker://ghcr.io/qmriflow/qmriflow-<group>:<version>``."""
    from . import __version__

    return {g: str(containers.get(g) or f"{IMAGE_REGISTRY}/qmriflow-{g}:{__version__}")
            for g in ("cpu", "cuda", "fsl")}


def _extend_with_default(validator_class: Any) -> Any:
    import jsonschema

    validate_props = validator_class.VALIDATORS["properties"]

    def set_defaults(validator: Any, properties: Any, instance: Any, schema: Any) -> Any:
        if isinstance(instance, dict):
            for prop, sub in properties.items():
                if "default" in sub and prop not in instance:
                    instance[prop] = _copy(sub["default"])
        yield from validate_props(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


def _copy(v: Any) -> Any:
    import copy

    return copy.deepcopy(v)


def load_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Read a YAML config file, apply ``overrides`` (top-level keys), validate."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read config: {exc}", path=p) from exc
    if not isinstance(data, dict):
        raise ConfigError("config must be a mapping", path=p)
    data.update(overrides or {})
    return validate_config(data)


def te_correction_from_config(config: Mapping[str, Any]) -> Any:
    from .physics import TECorrection

    return TECorrection.from_mapping(config.get("physics", {}).get("te_correction"))
