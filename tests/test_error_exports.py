"""Each package re-exports the errors its functions raise, so a user catches them where the function is called
(`from openmedgemma.imaging import ImageError, load_image`), and they are the classes of openmedgemma.errors."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from openmedgemma import errors

EXPORTS = {
    "openmedgemma.imaging": ("ImageError", "OpenMedGemmaError"),
    "openmedgemma.engine": ("OpenMedGemmaError", "CheckpointError", "ImageError", "TokenizerError"),
    "openmedgemma.eval": ("OpenMedGemmaError", "ConfigError", "DataError"),
    "openmedgemma.train": ("OpenMedGemmaError", "ConfigError", "DataError", "CheckpointError"),
    "openmedgemma.tokenizer": ("TokenizerError",),
    "openmedgemma.model": ("CheckpointError", "ConfigError"),
}


@pytest.mark.parametrize("package", sorted(EXPORTS))
def test_package_exports_its_errors(package):
    module = importlib.import_module(package)
    for name in EXPORTS[package]:
        assert getattr(module, name) is getattr(errors, name), f"{package}.{name}"
        assert name in dir(module) and name in module.__all__


def test_errors_import_without_torch():
    code = ("from openmedgemma.imaging import ImageError; from openmedgemma.eval import DataError; "
            "import sys; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_errors_are_caught_where_the_function_is_called(tmp_path):
    from openmedgemma.eval import DataError, get_task
    from openmedgemma.imaging import ImageError, load_image
    from openmedgemma.tokenizer import Tokenizer, TokenizerError
    from openmedgemma.train import ConfigError, load_config

    with pytest.raises(ImageError, match="missing.png"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(TokenizerError):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "bad.toml").write_text('stage = "sft"\n[train]\nsteps = -1\n')
    with pytest.raises(ConfigError, match="bad.toml"):
        load_config(tmp_path / "bad.toml")
    with pytest.raises(DataError):
        get_task("vqa-rad", tmp_path).load_examples()
