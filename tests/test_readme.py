"""The README's code examples run as written and say what is true."""
import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def run_example(section: str) -> dict:
    """Execute the first python block under the README heading ``section``; its variables."""
    block = re.search(rf"## {section}.*?```python\n(.*?)```", README.read_text(), re.S)
    assert block, f"README lost its example under '## {section}'"
    scope = {}
    exec(compile(block.group(1), "README.md", "exec"), scope)
    return scope


def test_layer_example_runs():
    scope = run_example("The layers")
    assert tuple(scope["y"].shape) == (2, 64, 32, 32)
    assert scope["lam"].summary()["closest_subgroup"] == "D4"
    assert scope["a"].likelihood is scope["b"].likelihood
    assert scope["plain"].weight.shape == (64, 3, 5, 5)


def test_readme_starts_with_the_two_commands():
    head = README.read_text().split("```")[1]
    assert "make demo" in head and "make test" in head


def test_model_example_runs():
    scope = run_example("The models")
    assert type(scope["plain"]).__name__ == "ResNet" and scope["model"].num_classes == 10


def test_deployment_example_runs():
    scope = run_example("TorchScript, torch.export, ONNX")
    model, x = scope["model"], scope["x"]
    with torch.no_grad():
        y = model(x)
        outputs = [scope["program"].module()(x), scope["scripted"](x), scope["traced"](x), scope["skeleton"].eval()(x)]
    for out in outputs:
        assert torch.allclose(out, y, atol=1e-4)
