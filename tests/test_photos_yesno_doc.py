"""The photos_yesno task YAML states the data's own question counts (issue 15.7)."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_task_yaml_states_the_question_counts_of_the_data():
    spec = json.loads((ROOT / "eval_configs" / "data" / "photos_yesno" / "questions.json").read_text())
    answers = [q["answer"] for q in spec["questions"]]
    text = (ROOT / "eval_configs" / "tasks" / "local_benchmarks" / "_photos_yesno_template_yaml").read_text()
    n, yes, no = map(int, re.search(r"(\d+) hand-written yes/no questions \((\d+) yes, (\d+) no\)", text).groups())
    assert (n, yes, no) == (len(answers), answers.count("yes"), answers.count("no"))
