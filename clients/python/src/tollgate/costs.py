"""Cost estimation and settlement for OpenAI- and Anthropic-style JSON bodies.

`LLMCosts().estimate(body)` charges, before the call, `ceil(prompt characters /
4) + max_tokens` tokens (times `n` choices), and, when `prices` are given,
the dollar worst case in `usd_micros`. `LLMCosts().actual(usage, body)` turns the
upstream's `usage` (OpenAI's `prompt_tokens`/`completion_tokens`/`total_tokens`,
Anthropic's `input_tokens`/`output_tokens` and cache fields) into the same units,
for settlement.

Prices are US dollars per million tokens, which is exactly micro-dollars per
token: `prices={"gpt-4o-mini": (0.15, 0.60)}` (input, output). A model is priced
by the name the request asked for, else by the name the response gives (providers
answer a dated snapshot, `gpt-4o-2024-08-06`): by the exact name, else by the
longest name of the table it starts with followed by `-`, `@` or `:`
(`gpt-4o-mini-2024-07-18` -> `gpt-4o-mini`; `gpt-4` never prices `gpt-4o`).
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any, Dict, Mapping, Optional, Tuple

#: What may follow a priced name in a snapshot's name: `gpt-4o-2024-08-06`,
#: `claude-3-5-sonnet@20240620` (Vertex), `...-v2:0` (Bedrock).
SNAPSHOT_SEPARATORS = ("-", "@", ":")


def _text_chars(value: Any) -> int:
    """Characters of text in a prompt-like value: a string, a list of strings,
    messages (`content` strings or parts with `text`), content blocks."""
    if value is None:
        return 0
    if isinstance(value, str):
        return len(value)
    if isinstance(value, (list, tuple)):
        return sum(_text_chars(v) for v in value)
    if isinstance(value, dict):
        total = 0
        for field in ("content", "text", "input", "arguments"):
            if field in value:
                total += _text_chars(value[field])
        if isinstance(value.get("tool_calls"), list):
            total += sum(_text_chars(c.get("function")) for c in value["tool_calls"] if isinstance(c, dict))
        return total
    return 0


def prompt_chars(body: Any) -> int:
    """Characters of prompt text in an OpenAI/Anthropic-style request body."""
    if not isinstance(body, dict):
        return 0
    return sum(_text_chars(body.get(field)) for field in ("messages", "system", "prompt", "input", "instructions"))


def max_output_tokens(body: Any) -> Optional[int]:
    if not isinstance(body, dict):
        return None
    for field in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        value = body.get(field)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


class LLMCosts:
    """The default cost model of the middleware (see the module docs)."""

    def __init__(
        self,
        prices: Optional[Mapping[str, Tuple[float, float]]] = None,
        *,
        default_max_tokens: int = 1024,
        chars_per_token: int = 4,
        token_unit: str = "token",
        money_unit: str = "usd_micros",
        default_price: Optional[Tuple[float, float]] = None,
    ) -> None:
        self.prices = {m: (Fraction(str(i)), Fraction(str(o))) for m, (i, o) in (prices or {}).items()}
        self.default_price = (
            None if default_price is None else (Fraction(str(default_price[0])), Fraction(str(default_price[1])))
        )
        # Longest first: a snapshot of `gpt-4o-mini` must not be priced as `gpt-4o`.
        self._longest_first = sorted(self.prices, key=len, reverse=True)
        self.default_max_tokens = default_max_tokens
        self.chars_per_token = chars_per_token
        self.token_unit = token_unit
        self.money_unit = money_unit

    def price(self, *models: Any) -> Optional[Tuple[Fraction, Fraction]]:
        """The price of the first of `models` the table knows (see the module
        docs for the match), else `default_price`."""
        for model in models:
            found = self._priced(model)
            if found is not None:
                return found
        return self.default_price

    def _priced(self, model: Any) -> Optional[Tuple[Fraction, Fraction]]:
        if not isinstance(model, str):
            return None
        exact = self.prices.get(model)
        if exact is not None:
            return exact
        for name in self._longest_first:
            if model.startswith(name) and model[len(name) : len(name) + 1] in SNAPSHOT_SEPARATORS:
                return self.prices[name]
        return None

    def estimate(self, body: Any) -> Dict[str, int]:
        """What to charge before the call: prompt/4 + max_tokens (x n)."""
        prompt = -(-prompt_chars(body) // self.chars_per_token)
        out = max_output_tokens(body)
        if out is None:
            out = self.default_max_tokens
        n = body.get("n", 1) if isinstance(body, dict) else 1
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            n = 1
        costs = {self.token_unit: prompt + out * n}
        price = self.price(body.get("model") if isinstance(body, dict) else None)
        if price is not None and self.money_unit:
            costs[self.money_unit] = int(math.ceil(prompt * price[0] + out * n * price[1]))
        return costs

    def actual(self, usage: Mapping[str, Any], body: Any = None) -> Dict[str, int]:
        """What the call really cost, from the upstream's `usage`."""
        inp, out = usage_tokens(usage)
        costs = {self.token_unit: inp + out}
        # The model asked for first: the estimate was priced by it.
        requested = body.get("model") if isinstance(body, dict) else None
        price = self.price(requested, usage.get("model"))
        if price is not None and self.money_unit:
            costs[self.money_unit] = int(math.ceil(inp * price[0] + out * price[1]))
        return costs


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def usage_tokens(usage: Mapping[str, Any]) -> Tuple[int, int]:
    """(input, output) tokens of an OpenAI or Anthropic `usage` object."""
    if "prompt_tokens" in usage or "completion_tokens" in usage:
        inp, out = _int(usage.get("prompt_tokens")), _int(usage.get("completion_tokens"))
        total = _int(usage.get("total_tokens"))
        if total > inp + out:  # e.g. reasoning tokens counted in the total only
            out = total - inp
        return inp, out
    if "input_tokens" in usage or "output_tokens" in usage:
        inp = (
            _int(usage.get("input_tokens"))
            + _int(usage.get("cache_creation_input_tokens"))
            + _int(usage.get("cache_read_input_tokens"))
        )
        return inp, _int(usage.get("output_tokens"))
    return 0, _int(usage.get("total_tokens"))
