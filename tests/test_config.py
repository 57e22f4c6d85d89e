import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from pipeline.config import Mode
from tests.conftest import job_config


def test_defaults_compose_to_the_disaggregated_job():
    cfg = job_config()
    assert cfg.mode is Mode.disaggregated
    assert cfg.model.bundled_gguf.endswith(".gguf")
    assert cfg.sampling.temperature == 0.0


def test_mode_and_sampling_overrides():
    cfg = job_config("mode=colocated", "sampling.max_tokens=7", "sampling.seed=3", "pools.decode.size=2")
    assert (cfg.mode, cfg.sampling.max_tokens, cfg.sampling.seed, cfg.pools.decode.size) == (Mode.colocated, 7, 3, 2)


@pytest.mark.parametrize(
    "override, message",
    [
        ("sampling.max_tokens=many", "max_tokens"),
        ("pools.prefill.sizes=2", "sizes"),
        ("mode=sideways", "mode/sideways"),
        ("model=nonexistent", "model/nonexistent"),
    ],
)
def test_bad_override_fails_before_any_work_naming_the_key(override, message):
    with pytest.raises((ConfigCompositionException, ValidationError)) as error:
        job_config(override)
    assert message in str(error.value) or message in str(error.value.__cause__)
