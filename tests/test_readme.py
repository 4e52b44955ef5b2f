"""The README's layer example runs as written and says what is true."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_layer_example_runs():
    text = README.read_text()
    block = re.search(r"## The layers.*?```python\n(.*?)```", text, re.S)
    assert block, "README lost its layer example"
    scope = {}
    exec(compile(block.group(1), "README.md", "exec"), scope)
    assert tuple(scope["y"].shape) == (2, 64, 32, 32)
    assert scope["lam"].summary()["closest_subgroup"] == "D4"
    assert scope["a"].likelihood is scope["b"].likelihood
    assert scope["plain"].weight.shape == (64, 3, 5, 5)


def test_readme_starts_with_the_two_commands():
    head = README.read_text().split("```")[1]
    assert "make demo" in head and "make test" in head


def test_model_example_runs():
    text = README.read_text()
    block = re.search(r"## The models.*?```python\n(.*?)```", text, re.S)
    assert block, "README lost its model example"
    scope = {}
    exec(compile(block.group(1), "README.md", "exec"), scope)
    assert type(scope["plain"]).__name__ == "ResNet" and scope["model"].num_classes == 10
