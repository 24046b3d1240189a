"""Judge requests and the parsing of their replies, for the three modes.

- single:    the judge scores one answer 1-10 with a rubric.
- reference: the judge scores one answer 1-10 against the question's reference answer.
- pairwise:  the judge picks the better of two answers, asked twice with the positions swapped; the two verdicts
             are combined in `stats.combine_pairwise` (disagreement = tie), so position bias cannot decide.

A reply is parsed strictly, in the rubric's stated form ("Score: N", "[[A]]"): a weak judge's "The answer is: 10."
is not a score. `eval.judge_fallbacks` adds readers after the strict one: `tolerant` ("8/10", a lone number, a
reply starting with "A") and `logprob` (scores only: the probability-weighted score at the first reply position
where the judge put most of its mass on 1-10). What no reader accepts is sent back once with the parser's error,
and what fails again is recorded with `parse: "failed"` and both replies; `parse` says which reader decided, and
the stage reports each one's share. When the backend returns logprobs for the score token, `weighted_score` is the
probability-weighted mean over the scores 1-10.
"""

from __future__ import annotations

import math
import re
from typing import Any

from baize_exp.chat.ask import ask_parsed
from baize_exp.io import KeyedJsonl, content_hash

# "Score: 7", "**Score:** 7", "score = 7": the form every shipped rubric asks for
_SCORE = re.compile(r"\bscore\s*\**\s*[:=]\s*\**\s*(\d+(?:\.\d+)?)", re.IGNORECASE)
_OUT_OF_10 = re.compile(r"\b(\d+(?:\.\d+)?)\s*(?:/|out of)\s*10\b", re.IGNORECASE)
_NUMBER = re.compile(r"\b\d+(?:\.\d+)?\b")
_VERDICT = re.compile(r"\[\[\s*([ABC])\s*\]\]")
_VERDICT_LOOSE = re.compile(r"^\W*(?:assistant\s+)?([ABC]|tie)\b", re.IGNORECASE)
# a token that is a plain number: str.isdigit() also accepts "²", which int() refuses (seen in a judge's top logprobs)
_ASCII_INT = re.compile(r"[0-9]+")


def parse_score(
    reply: str, fallbacks: tuple[str, ...] | list[str] = (), logprobs: dict | None = None
) -> tuple[float | None, str, str | None]:
    """(score, how, error) from a judge's reply.

    Strict ("ok"): "Score: N" with N in 1..10, one distinct value. With "tolerant" in `fallbacks`: "N/10" or
    "N out of 10", else the one distinct number in 1..10 if the reply holds only one. With "logprob": the
    probability-weighted score where the reply's logprobs show the judge choosing a score (`logprob_score`).
    Otherwise (None, "failed", what was wrong)."""
    reply = reply or ""
    found = list(dict.fromkeys(float(x) for x in _SCORE.findall(reply)))
    if len(found) == 1:
        if 1 <= found[0] <= 10:
            return found[0], "ok", None
        error = f"'Score: {_fmt(found[0])}' is outside 1-10"
    elif len(found) > 1:
        error = f"the reply states several scores {[_fmt(x) for x in found]}"
    else:
        error = "the reply has no 'Score: N'"
    if "tolerant" in fallbacks and not found:
        m = _OUT_OF_10.search(reply)
        if m and 1 <= float(m.group(1)) <= 10:
            return float(m.group(1)), "tolerant", None
        nums = list(dict.fromkeys(float(x) for x in _NUMBER.findall(reply) if 1 <= float(x) <= 10))
        if len(nums) == 1:
            return nums[0], "tolerant", None
        error += (
            " and no number from 1 to 10" if not nums else f" and several candidate numbers {[_fmt(x) for x in nums]}"
        )
    if "logprob" in fallbacks:
        v = logprob_score(logprobs)
        if v is not None:
            return v, "logprob", None
    return None, "failed", error


def parse_verdict(reply: str, fallbacks: tuple[str, ...] | list[str] = ()) -> tuple[str | None, str, str | None]:
    """("A" | "B" | "C", how, error) from a pairwise reply; C is a tie.

    Strict ("ok"): exactly one distinct [[A]]/[[B]]/[[C]]. With "tolerant" in `fallbacks`: a reply that starts
    with A, B, C, "Assistant A" or "tie". Otherwise (None, "failed", what was wrong)."""
    reply = reply or ""
    found = list(dict.fromkeys(_VERDICT.findall(reply)))
    if len(found) == 1:
        return found[0], "ok", None
    if len(found) > 1:
        return None, "failed", f"the reply names several verdicts {found}"
    if "tolerant" in fallbacks:
        m = _VERDICT_LOOSE.match(reply.strip())
        if m:
            v = m.group(1).upper()
            return ("C" if v == "TIE" else v), "tolerant", None
    return None, "failed", "the reply has no [[A]], [[B]] or [[C]]"


def logprob_score(logprobs: dict | None, min_mass: float = 0.5) -> float | None:
    """The probability-weighted score over 1..10 at the first reply position whose shown alternatives put at
    least `min_mass` of their probability on score tokens; None without logprobs or such a position. A fallback
    for replies that never state a score: it reads what the judge was about to say, not what it said."""
    for t in (logprobs or {}).get("content") or []:
        alts = t.get("top_logprobs") or [{"token": t["token"], "logprob": t["logprob"]}]
        mass = {a["token"].strip(): math.exp(a["logprob"]) for a in alts}
        digits = {int(k): p for k, p in mass.items() if _ASCII_INT.fullmatch(k) and 1 <= int(k) <= 10}
        if digits and sum(digits.values()) >= min_mass * sum(mass.values()):
            return round(sum(s * p for s, p in digits.items()) / sum(digits.values()), 4)
    return None


def _fmt(x: float) -> str:
    return str(int(x)) if x == int(x) else str(x)


def weighted_score(reply: str, logprobs: dict | None) -> float | None:
    """Probability-weighted score Σ s·p(s) / Σ p(s) over s in 1..10, read at the token where the parsed score
    starts; None without logprobs or when that token cannot be located.

    Tokenizers that split digits (SmolLM2, LLaMA) write 10 as "1","0": when the chosen token is "1", its mass is
    split by the next position's probability of "0"; an unchosen alternative "1" counts as 1 (its continuation
    was never computed)."""
    content = (logprobs or {}).get("content") or []
    if not content:
        return None
    m = _SCORE.search(reply or "") or _OUT_OF_10.search(reply or "")
    if not m:
        return None
    offsets, pos = [], 0
    for t in content:
        offsets.append(pos)
        pos += len(t["token"])
    if "".join(t["token"] for t in content) != reply:
        return None  # the tokens do not spell the reply (e.g. a cut stop string): do not guess
    if m.start(1) not in offsets:
        return None
    k = offsets.index(m.start(1))
    probs: dict[int, float] = {}
    for alt in content[k].get("top_logprobs") or []:
        tok = alt["token"].strip()
        if _ASCII_INT.fullmatch(tok) and 1 <= int(tok) <= 10:
            probs[int(tok)] = probs.get(int(tok), 0.0) + math.exp(alt["logprob"])
    chosen = content[k]["token"].strip()
    if chosen == "1" and 1 in probs and k + 1 < len(content):
        nxt = content[k + 1]
        p0 = sum(math.exp(a["logprob"]) for a in nxt.get("top_logprobs") or [] if a["token"] == "0")
        if not nxt.get("top_logprobs") and nxt["token"] == "0":
            p0 = math.exp(nxt["logprob"])
        p1 = probs.pop(1)
        probs[10] = probs.get(10, 0.0) + p1 * p0
        probs[1] = p1 * (1 - p0)
    total = sum(probs.values())
    if total <= 0:
        return None
    return round(sum(s * p for s, p in probs.items()) / total, 4)


def build_jobs(
    mode: str,
    templates: Any,
    questions: dict[str, dict],
    answers: list[dict],
    opponent: dict[str, str] | None = None,
    repeats: int = 1,
) -> list[dict]:
    """One job per judge request: {"messages", "record"}; pairwise gives two per answer (swap False/True).
    single/reference with `repeats` > 1 ask the same question that many times (`record["repeat"]`), which is
    what self-consistency is measured on."""
    if repeats > 1 and mode != "pairwise":
        once = build_jobs(mode, templates, questions, answers, opponent)
        return [
            {"messages": j["messages"], "record": {**j["record"], "repeat": r}} for j in once for r in range(repeats)
        ]
    jobs = []
    for a in answers:
        q = questions[a["question_id"]]
        base = {"question_id": a["question_id"], "category": a["category"], "model": a["model"], "mode": mode}
        if mode == "single":
            prompt = templates.judge_template.format(question=q["question"], answer=a["answer"])
            jobs.append({"messages": _user(prompt), "record": {**base, "swap": False}})
        elif mode == "reference":
            prompt = templates.reference_template.format(
                question=q["question"], reference=q["reference"], answer=a["answer"]
            )
            jobs.append({"messages": _user(prompt), "record": {**base, "swap": False}})
        elif mode == "pairwise":
            other = (opponent or {}).get(a["question_id"])
            for swap in (False, True):
                rec = {**base, "swap": swap, "opponent": templates.pairwise_against}
                if other is None:  # the opponent has no answer (its request failed): recorded, not judged
                    jobs.append({"messages": None, "record": {**rec, "error": "no opponent answer"}})
                    continue
                first, second = (other, a["answer"]) if swap else (a["answer"], other)
                prompt = templates.pairwise_template.format(question=q["question"], answer_a=first, answer_b=second)
                jobs.append({"messages": _user(prompt), "record": rec})
        else:
            raise ValueError(f"eval.judge_mode={mode!r}: one of single, pairwise, reference")
    return jobs


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _judged(
    mode: str, reply: str, logprobs: dict | None, fallbacks: tuple[str, ...] = ()
) -> tuple[dict, str, str | None]:
    """(the result fields a reply gives, how it parsed, the parser's error). Pairwise gives the verdict; who won
    follows from the job's `swap` (see `_winner`)."""
    if mode == "pairwise":
        verdict, how, err = parse_verdict(reply, fallbacks)
        return {"verdict": verdict}, how, err
    score, how, err = parse_score(reply, fallbacks, logprobs)
    return {"score": score, "weighted_score": weighted_score(reply, logprobs) if score is not None else None}, how, err


def _fill(mode: str, rec: dict, fields: dict | None) -> None:
    """Put a parsed result (None: nothing parsed) into a judgment record."""
    if mode == "pairwise":
        verdict = (fields or {}).get("verdict")
        a_is_model = not rec["swap"]
        rec["verdict"] = verdict
        rec["winner"] = (
            None
            if verdict is None
            else {"A": "model" if a_is_model else "opponent", "B": "opponent" if a_is_model else "model", "C": "tie"}[
                verdict
            ]
        )
    else:
        rec.update(fields or {"score": None, "weighted_score": None})


def run_judge(
    client: Any,
    mode: str,
    jobs: list[dict],
    retry_template: str,
    logprobs: bool = False,
    cache: KeyedJsonl | None = None,
    fallbacks: tuple[str, ...] | list[str] = (),
) -> list[dict]:
    """Send every job, parse, retry the unparsable once with the parser's error (`chat.ask.ask_parsed`); return
    the judgment records.

    With a `cache` (one per judge identity), a job whose conversation and settings were judged before takes the
    stored replies, parsed again, and sends nothing. Unreadable replies are stored too: a greedy judge's is taken
    as the parse failure it was (asking again would give the same words), a sampling judge's is asked again. A
    request that failed is never stored. The judge's sampling settings (judge.temperature, 0 in the shipped
    judges, so a stored reply is the reply) are part of the key; so is a repeat's index (`build_jobs(repeats=)`),
    so each repeat is its own request. `fallbacks`: the readers tried after the strict one (module docstring)."""
    fallbacks = tuple(fallbacks)
    greedy = client.defaults.get("temperature") == 0  # its replies repeat: an unreadable one need not be asked again
    params: dict[str, Any] = {}
    if (logprobs or "logprob" in fallbacks) and mode != "pairwise":
        params.update(logprobs=True, top_logprobs=20)
    keys = [
        content_hash(
            j["messages"],
            {**client.defaults, **params},
            retry_template,
            *([j["record"]["repeat"]] if j["record"].get("repeat") else []),
        )
        for j in jobs
    ]
    records = [dict(j["record"]) for j in jobs]
    live = []
    for i, j in enumerate(jobs):
        if j["messages"] is None:
            records[i].update(
                parse="failed",
                judge_reply=None,
                **({"winner": None, "verdict": None} if mode == "pairwise" else {"score": None}),
            )
        elif not (cache and _from_cache(mode, records[i], cache.get(keys[i]), fallbacks, greedy)):
            live.append(i)

    def parse(res: Any) -> tuple[dict | None, str, str | None]:
        fields, how, err = _judged(mode, res.text, res.logprobs[0] if res.logprobs else None, fallbacks)
        return (fields if how != "failed" else None), how, err

    answers = ask_parsed(
        client,
        [jobs[i]["messages"] for i in live],
        parse,
        lambda err: retry_template.format(error=err),
        f"judge ({mode})",
        **params,
    )
    for i, a in zip(live, answers, strict=True):
        rec = records[i]
        _fill(mode, rec, a.value)
        rec.update(judge_reply=a.reply, parse=a.how, error=None if a.value is not None else a.error)
        if a.retried:
            rec["judge_reply_retry"] = a.retry_reply
        if a.failed:
            rec["failed"] = a.failed  # asked again by a rerun (never cached)
    if cache is not None:  # every reply that came back, read or not (a request that failed is asked again)
        cache.put_many(
            [
                (
                    keys[i],
                    {
                        "judge_reply": records[i]["judge_reply"],
                        "logprobs": a.logprobs,
                        **({"judge_reply_retry": a.retry_reply} if a.retried else {}),
                    },
                )
                for i, a in zip(live, answers, strict=True)
                if not a.failed and a.reply is not None
            ]
        )
    return records


def _from_cache(mode: str, rec: dict, hit: dict | None, fallbacks: tuple[str, ...] = (), greedy: bool = False) -> bool:
    """Fill `rec` from a stored judgment (parsed again, so changed fallbacks apply); False if there is none, or
    it does not parse and the judge samples (the job is then sent, and its reply overwrites what this filled). A
    greedy judge's unparsable reply is its reply: it is taken from the store as a parse failure, not asked again."""
    if hit is None:
        return False
    retry = hit.get("judge_reply_retry")
    fields, how, err = _judged(
        mode, hit["judge_reply"] or "", None if retry is not None else hit.get("logprobs"), fallbacks
    )
    if how == "failed" and retry is not None:
        fields, how, err = _judged(mode, retry, hit.get("logprobs"), fallbacks)
        how = "retried" if how != "failed" else how
    if how == "failed" and not greedy:
        return False
    _fill(mode, rec, fields if how != "failed" else None)
    rec.update(
        parse=how,
        judge_reply=hit["judge_reply"],
        error=err if how == "failed" else None,
        cached=True,
        **({"judge_reply_retry": retry} if retry is not None else {}),
    )
    return True
