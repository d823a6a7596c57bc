"""The README quotes the code's defaults: each quoted setting is built here from the config."""

import pathlib

from drmi_ray.config import ExperimentConfig
from drmi_ray.experiment import quick

README = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
MODEL_NAMES = {"c3f2": "C3F2", "lenet5": "LeNet-5", "dnn5": "DNN5", "resnet18": "ResNet18"}


def test_readme_quotes_the_default_settings_of_the_code():
    c, q = ExperimentConfig(), quick(ExperimentConfig())
    target, sub, attack = c.target.train, c.substitute, c.attack
    assert target.lr == sub.lr and target.batch_size == sub.batch_size and target.min_steps == sub.min_steps
    assert q.target.train.model == q.substitute.model
    budgets = c.selection.budgets
    quoted = [
        f"Adam, learning rate {sub.lr:g}, batch {sub.batch_size}, at least {sub.min_steps} steps",
        f"target {MODEL_NAMES[target.model]} for {target.epochs} epochs on {c.pool.target_train:,} digits",
        f"substitutes {MODEL_NAMES[sub.model]} for {sub.epochs} epochs",
        f"{MODEL_NAMES[q.substitute.model]} for both, a pool of {q.pool.pool}, test split {q.pool.test}, "
        f"budgets {' and '.join(map(str, q.selection.budgets))}",
        f"budgets {', '.join(map(str, budgets[:-1]))} and {budgets[-1]}",
        f"eps {attack.eps:g}, step {attack.step_size:g}, {attack.steps} steps",
        f"By default (`--learn {c.learn}`, `--augment {sub.augment}`)",
    ]
    readme = " ".join(README.split())  # line breaks as spaces
    assert [s for s in quoted if s not in readme] == []
