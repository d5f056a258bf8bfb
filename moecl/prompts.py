"""Instruction format: each task is a prompt template whose answer is one of the task's label words.

    {instruction}\\n\\n{text}\\n\\nAnswer: {label}<eos>

Only the text is truncated, so the instruction and every answer always fit in `max_length`.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from .data import Example


def default_instruction(task: str, labels: list[str]) -> str:
    return f"Task: {task}. Classify the text. Answer with one of: {', '.join(labels)}."


@dataclass
class TaskPrompt:
    """Token ids for one task's template pieces and its answers."""
    tokenizer: object
    task: str
    labels: list[str]
    max_length: int
    instruction: str | None = None

    def _encode(self, text: str, special: bool = False) -> list[int]:
        return self.tokenizer(text, add_special_tokens=special)["input_ids"]

    @cached_property
    def prefix(self) -> list[int]:
        instruction = self.instruction or default_instruction(self.task, self.labels)
        return self._encode(f"{instruction}\n\n", special=True)

    @cached_property
    def suffix(self) -> list[int]:
        return self._encode("\n\nAnswer:")

    @cached_property
    def answers(self) -> list[list[int]]:
        """Per label: its words after a space, then end-of-sequence (so 'negative' and
        'negative ...' are told apart and the answer's end is learned)."""
        return [self._encode(f" {label}") + [self.tokenizer.eos_token_id] for label in self.labels]

    @cached_property
    def text_budget(self) -> int:
        budget = self.max_length - len(self.prefix) - len(self.suffix) - max(map(len, self.answers))
        if budget < 8:
            raise ValueError(f"max_length {self.max_length} leaves {budget} tokens of text for task "
                             f"'{self.task}' after its instruction and answers; raise train.max_length")
        return budget

    def prompt(self, text: str) -> list[int]:
        return self.prefix + self._encode(text)[: self.text_budget] + self.suffix

    def training_pair(self, example: Example) -> tuple[list[int], list[int]]:
        """(input ids, labels) with the loss on the answer tokens only."""
        prompt, answer = self.prompt(example.text), self.answers[example.label]
        return prompt + answer, [-100] * len(prompt) + answer
