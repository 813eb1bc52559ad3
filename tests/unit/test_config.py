from pathlib import Path

import pytest
import yaml

from tsugiki.config import load_settings
from tsugiki.errors import ConfigError

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_precedence_flags_over_env_over_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("engine: {max_batch_size: 4, default_max_tokens: 10}\nserver: {port: 9001}\n")
    monkeypatch.setenv("TSUGIKI_ENGINE__MAX_BATCH_SIZE", "8")
    monkeypatch.setenv("TSUGIKI_SERVER__API_KEYS", "k1,k2")
    s = load_settings(f, server={"port": 9100})
    assert s.engine.max_batch_size == 8 and s.engine.default_max_tokens == 10
    assert s.server.port == 9100 and s.server.api_keys == ("k1", "k2")


def test_bad_settings_name_key_and_value(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"engine.max_batch_size: .*greater than 0 \(got 0\)"):
        load_settings(engine={"max_batch_size": 0})
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_settings(tmp_path / "list.yaml")
    with pytest.raises(ConfigError, match="engine.nonsense"):
        load_settings(engine={"nonsense": 1})


@pytest.mark.parametrize("name", ["serve_config.yaml", "serve_config_cluster.yaml"])
def test_serve_configs_validate_with_rays_schema_and_ours(name: str) -> None:
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load((DEPLOY / name).read_text())
    schema = ServeDeploySchema.model_validate(raw) if hasattr(ServeDeploySchema, "model_validate") \
        else ServeDeploySchema.parse_obj(raw)
    app = schema.applications[0]
    assert app.import_path == "tsugiki.serve.deployments:app_builder"
    assert {d.name for d in app.deployments} == {"LLMServer", "Gateway", "Monitor", "Controller"}
    load_settings(**app.args)  # tsugiki's own settings in `args` are valid too
