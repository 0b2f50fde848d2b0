"""Answer quality: labelled answer sets (eval/answers.jsonl), their evaluation through the Engine
per agent and temperature, and the comparison of two agents (`orion-fsm eval`, `models compare`).

    questions = load_answer_set("eval/answers.jsonl")
    report = await evaluate(engine, questions, agents=["conversation"], temperatures=[0, 0.7],
                            samples=3)
    report.score("conversation", 0).categories["fact_en"].interval
"""

from ._answers import AnswerCheck, AnswerQuestion, load_answer_set, matches, passes
from ._evaluate import (
    AgentScore,
    Answer,
    AnswerReport,
    Comparison,
    EvalProgress,
    Tally,
    compare,
    evaluate,
)
from ._stats import Verdict, difference_interval, verdict, wilson_interval

__all__ = [
    "AgentScore",
    "Answer",
    "AnswerCheck",
    "AnswerQuestion",
    "AnswerReport",
    "Comparison",
    "EvalProgress",
    "Tally",
    "Verdict",
    "compare",
    "difference_interval",
    "evaluate",
    "load_answer_set",
    "matches",
    "passes",
    "verdict",
    "wilson_interval",
]
