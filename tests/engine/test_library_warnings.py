"""Library warnings a user cannot act on (peft's second-adapter warning) go to the run's
library.log, not the console; every other warning still shows."""

from __future__ import annotations

import logging
import warnings

import pytest

from flowopd.engine.logging import LIBRARY_LOG, RunLogger, library_log, library_warnings

PEFT = "Already found a `peft_config` attribute in the model. This will lead to having multiple adapters in the model."


@pytest.fixture(autouse=True)
def _detach_files():
    yield
    for h in [h for h in library_log.handlers if isinstance(h, logging.FileHandler)]:
        library_log.removeHandler(h)
        h.close()


def test_noise_goes_to_the_run_log_and_other_warnings_show(tmp_path, recwarn):
    RunLogger(tmp_path / "run", enabled=True, tensorboard=False)  # a run attaches its log
    with library_warnings():
        warnings.warn(PEFT, UserWarning, stacklevel=1)
        warnings.warn("a warning the user can act on", UserWarning, stacklevel=1)
    assert [str(w.message) for w in recwarn] == ["a warning the user can act on"]
    text = (tmp_path / "run" / LIBRARY_LOG).read_text()
    assert "UserWarning: Already found a `peft_config`" in text and "act on" not in text


def test_outside_the_context_nothing_is_routed(tmp_path, recwarn):
    RunLogger(tmp_path, enabled=True, tensorboard=False)
    warnings.warn(PEFT, UserWarning, stacklevel=1)
    assert len(recwarn) == 1 and not (tmp_path / LIBRARY_LOG).exists()


def test_adapters_after_the_first_add_and_load_without_the_peft_warning(
    tiny_model, tmp_path, recwarn
):
    tiny_model.add_adapter("a", rank=2, alpha=2)
    lora = tmp_path / "lora"
    tiny_model.save_adapter("a", lora)
    tiny_model.load_adapter(str(lora), "b")
    tiny_model.load_adapter(str(lora), "c")
    tiny_model.add_adapter("d", rank=2, alpha=2)
    assert not [w for w in recwarn if "peft_config" in str(w.message)]
