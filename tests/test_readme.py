"""The README's code examples run as written and say what is true."""
import ast
import importlib.util
import inspect
import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def run_example(section: str) -> dict:
    """Execute the first python block under the README heading ``section``; its variables."""
    block = re.search(rf"## {section}.*?```python\n(.*?)```", README.read_text(), re.S)
    assert block, f"README lost its example under '## {section}'"
    scope = {}
    exec(compile(block.group(1), "README.md", "exec"), scope)
    return scope


def test_readme_starts_with_the_two_commands():
    head = README.read_text().split("```")[1]
    assert "make demo" in head and "make test" in head


def test_readme_is_short():
    assert len(README.read_text().splitlines()) <= 300


def test_quick_start_trains_one_step_and_reads_lambda():
    torch.manual_seed(0)
    scope = run_example("Quick start")
    model = scope["model"]
    assert model.num_classes == 10
    assert scope["loss"].requires_grad and torch.isfinite(scope["loss"])
    assert set(scope["parts"]) == {"alignment", "kl_chain", "kl_uniform"}
    # the optimiser step reached the likelihoods: λ's coefficients have gradients
    lam = scope["lams"]["layer1.0.conv1.likelihood"]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in lam.parameters())
    assert scope["summary"]["closest_subgroup"] == "D4" and scope["summary"]["group"] == "D4"


def test_layer_example_runs():
    scope = run_example("The layers")
    assert tuple(scope["y"].shape) == (2, 64, 32, 32)
    assert scope["lam"].summary()["closest_subgroup"] == "D4"
    assert scope["a"].likelihood is scope["b"].likelihood
    assert scope["plain"].weight.shape == (64, 3, 5, 5)


def test_deployment_example_runs():
    scope = run_example("TorchScript, torch.export, ONNX")
    model, x = scope["model"], scope["x"]
    with torch.no_grad():
        y = model(x)
        outputs = [scope["program"].module()(x), scope["scripted"](x), scope["traced"](x), scope["skeleton"].eval()(x)]
    for out in outputs:
        assert torch.allclose(out, y, atol=1e-4)
    # what gets scripted is timm's own model
    assert type(scope["eqzoo"].export(model)).__name__ == "ResNet" and model.num_classes == 10


def test_paths_named_in_the_readmes_exist():
    for readme in (README, ROOT / "scripts" / "README.md"):
        text = readme.read_text()
        links = re.findall(r"\]\(([^)#:]+)\)", text)  # relative links
        paths = re.findall(r"(?<![\w/.])((?:scripts|configs|eqzoo|tests)/[\w/.*-]+\.(?:py|yaml|md))", text)
        for path in links + paths:
            base = ROOT if path.startswith(("scripts/", "configs/", "eqzoo/", "tests/")) else readme.parent
            assert list(base.glob(path)), f"{readme.name} names {path}, which does not exist"


def test_model_table_is_the_models_as_built():
    """Params and GMACs in the README are those of the models built by default (regenerate the
    table with ``python scripts/model_table.py --write``)."""
    spec = importlib.util.spec_from_file_location("model_table", ROOT / "scripts" / "model_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    text = README.read_text()
    assert table.HEADER in text, "README lost its model table"
    rows = table.readme_rows(text)
    assert [row.split(" | ")[0].lstrip("| ") for row in rows] == list(table.MODELS)
    assert rows == [table.model_row(name) for name in table.MODELS]


def test_options_table_is_the_declared_options():
    """The options table lists every option the layer factory takes, with the constructors'
    defaults and every accepted choice."""
    from eqzoo.models import PEResNet, PEWideResNet
    from eqzoo.validate import OPTIONS, options_where

    text = README.read_text()
    rows = re.findall(r"^\| `(\w+)` \| `([^`]*)` \| (.*?) \| .* \|$", text, re.M)
    assert rows, "README lost its options table"
    names = [name for name, _, _ in rows]
    assert set(options_where(layer=True)) <= set(names)
    for name, default, values in rows:
        assert name in OPTIONS, f"the README's options table names {name}, which is no model option"
        for cls in (PEResNet, PEWideResNet):
            param = inspect.signature(cls.__init__).parameters.get(name)
            if param is not None:
                assert ast.literal_eval(default) == param.default, (name, cls.__name__)
        for choice in OPTIONS[name].choices or ():
            assert f'`"{choice}"`' in values, f"README's {name} row lacks the value {choice!r}"
