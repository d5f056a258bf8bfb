"""Instruction format: each task is a prompt template whose answer is one of the task's label words.

    {text}\\n\\n{instruction}\\n\\nAnswer: {label}<eos>

The text comes first. In a causal model its tokens then never attend to the instruction or the task
name, so their hidden states depend on the text alone: that is what the discriminator reads (it
cannot win by spotting the task name) and what task-free routing reads (no task is needed to compute
it). Only the text is truncated, so the instruction and every answer always fit in `max_length`.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache

from .data import Example


def default_instruction(task: str, labels: list[str]) -> str:
    return f"Task: {task}. Classify the text above. Answer with one of: {', '.join(labels)}."


@lru_cache(maxsize=8)
def special_prefix(tokenizer) -> tuple[int, ...]:
    """The tokens the tokenizer puts before any text (BOS for Llama-2 style tokenizers, none for SmolLM2)."""
    ids = tokenizer("", add_special_tokens=True)["input_ids"]
    return tuple(i for i in ids if i != tokenizer.eos_token_id)


def encode_text(tokenizer, text: str, budget: int) -> list[int]:
    """A text's tokens, truncated to `budget`, after the special prefix: the same ids for every task."""
    return [*special_prefix(tokenizer), *tokenizer(text, add_special_tokens=False)["input_ids"][:budget]]


@dataclass
class Encoded:
    """One example's token ids: `text_length` leading ids are the text (special prefix included)."""
    ids: list[int]
    labels: list[int]  # -100 except on the answer tokens
    text_length: int


@dataclass
class TaskPrompt:
    """Token ids for one task's template pieces and its answers."""
    tokenizer: object
    task: str
    labels: list[str]
    max_length: int
    instruction: str | None = None

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @cached_property
    def suffix(self) -> list[int]:
        instruction = self.instruction or default_instruction(self.task, self.labels)
        return self._encode(f"\n\n{instruction}\n\nAnswer:")

    @cached_property
    def answers(self) -> list[list[int]]:
        """Per label: its words after a space, then end-of-sequence (so 'negative' and
        'negative ...' are told apart and the answer's end is learned)."""
        return [self._encode(f" {label}") + [self.tokenizer.eos_token_id] for label in self.labels]

    @cached_property
    def text_budget(self) -> int:
        fixed = len(special_prefix(self.tokenizer)) + len(self.suffix) + max(map(len, self.answers))
        budget = self.max_length - fixed
        if budget < 8:
            raise ValueError(f"max_length {self.max_length} leaves {budget} tokens of text for task "
                             f"'{self.task}' after its instruction and answers; raise train.max_length")
        return budget

    def text_ids(self, text: str) -> list[int]:
        return encode_text(self.tokenizer, text, self.text_budget)

    def prompt(self, text: str) -> list[int]:
        return self.text_ids(text) + self.suffix

    def encode(self, text: str, label: int) -> Encoded:
        """Prompt plus the answer `label`, with the loss on the answer tokens only."""
        text_ids = self.text_ids(text)
        prompt, answer = text_ids + self.suffix, self.answers[label]
        return Encoded(prompt + answer, [-100] * len(prompt) + answer, len(text_ids))

    def training_pair(self, example: Example) -> Encoded:
        return self.encode(example.text, example.label)
