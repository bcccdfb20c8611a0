"""Token counting (_tokenizers, _estimator, _bounds, _calibration): exact bundled counts, spans,
the estimator's bounds, the strict upper bound, count_async and Calibration. Everything runs
offline on the vendored tokenizers."""

# ruff: noqa: RUF001  (Chinese text is written with its own full-width punctuation)

from __future__ import annotations

import asyncio
import base64
import importlib
import inspect
import itertools
import json
import math
import random
import sys
import textwrap
import threading
import unicodedata
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from functools import cache
from pathlib import Path

import numpy as np
import pytest

from sfembed import _estimator, _tokenizers
from sfembed._bounds import upper_bound
from sfembed._calibration import Calibration
from sfembed._estimator import CharClassEstimator
from sfembed._exceptions import ConfigError, InputError
from sfembed._models import DEFAULT_CATALOG, ModelSpec
from sfembed._tokenizers import ExactCounter, count_async, counter_for

FAMILIES = ("qwen3", "xlmr", "bert-en", "bert-zh")
MODEL_OF = {
    "qwen3": "Qwen/Qwen3-Embedding-8B",
    "qwen3-vl": "Qwen/Qwen3-VL-Embedding-8B",
    "xlmr": "BAAI/bge-m3",
    "bert-en": "BAAI/bge-large-en-v1.5",
    "bert-zh": "BAAI/bge-large-zh-v1.5",
}
SAMPLE = (
    "Embedding models map sentences to vectors. 嵌入模型把句子映射为向量。 Café naïve 12345 😀!"
)


def spec_of(family: str) -> ModelSpec:
    return DEFAULT_CATALOG[MODEL_OF[family]]


def bare(family: str) -> ExactCounter:
    """The exact counter of ``family`` without special tokens."""
    return ExactCounter(_tokenizers.bundled_tokenizer(_tokenizers.FAMILIES[family]))


# --- a deterministic, varied corpus ----------------------------------------------------------

ENGLISH = [
    "The committee met on Tuesday to review the budget for the coming fiscal year.",
    "Researchers at the university found that sleep quality strongly predicts memory recall.",
    "She packed her bags, locked the door, and drove north before the storm arrived.",
    "Embedding models map sentences to vectors so that similar meanings end up close together.",
    "In 1969, astronauts landed on the Moon and returned safely to Earth eight days later.",
    "Please make sure the configuration file is readable before restarting the service.",
    "Our quarterly revenue grew faster than expected, driven mainly by subscriptions in Europe.",
    "The old lighthouse keeper wrote letters every evening, though nobody ever answered them.",
    "Photosynthesis converts light energy into chemical energy stored in glucose molecules.",
    "If the request fails with a rate limit error, wait a few seconds and try again.",
    "Despite the heavy rain, thousands of fans gathered outside the stadium to celebrate.",
    "A well-written function does one thing, has a clear name, and is easy to test.",
    "The museum's new exhibition explores how maps shaped trade routes in the Middle Ages.",
    "Customers reported that the mobile application crashed whenever they uploaded photos.",
    "He couldn't remember where he'd left his keys, so he retraced his steps through the park.",
    "Climate scientists warn that glaciers in the Alps may lose half their volume by 2050.",
    "The recipe calls for two cups of flour, one egg, and a pinch of salt.",
    "Negotiations between the unions and management continued late into the night.",
    "Machine translation has improved dramatically, yet idioms remain surprisingly difficult.",
    "According to the report, unemployment fell to its lowest level in two decades.",
    "Tokenizers split text into subword units; rare words become several pieces.",
    "Biodiversity loss threatens pollination, water purification, and soil fertility worldwide.",
    "Mr. O'Brien's antique clock, a family heirloom, still chimes precisely at noon.",
    "THE SOFTWARE IS PROVIDED AS IS, WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED.",
    "Interoperability, scalability and maintainability were the architects' main concerns.",
    "Volunteers planted four hundred oak saplings along the river bank last spring.",
    "The defendant's lawyer argued that the evidence had been obtained unlawfully.",
    "Quantum computers exploit superposition and entanglement to explore many states at once.",
    "Inflation-adjusted wages have barely moved since the early nineteen-nineties.",
    "Neuroscientists mapped the hippocampus of mice navigating a virtual maze.",
    "Her startup sells refurbished laptops to schools across sub-Saharan Africa.",
    "The archaeologists unearthed Roman coins, pottery shards and a bronze brooch.",
    "Thermodynamics tells us that entropy in an isolated system never decreases.",
]
CHINESE = [
    "今天天气很好，我们一起去公园散步吧。",
    "这家公司的年度报告显示，营业收入比去年增长了百分之十五。",
    "人工智能技术正在深刻地改变医疗、教育和金融等多个行业。",
    "他每天早上六点起床，先跑步半小时，然后吃早饭。",
    "长江是中国最长的河流，全长约六千三百公里。",
    "随着城市化进程的加快，交通拥堵问题日益严重。",
    "研究人员发现，适量运动可以有效降低患心脏病的风险。",
    "会议将于下周三上午九点在三楼的大会议室举行。",
    "春节是中国最重要的传统节日，家家户户都会团聚在一起。",
    "向量检索系统会把文本转换成向量，再根据相似度排序。",
    "如果接口返回错误代码，请稍等片刻后重新尝试。",
    "“你确定要删除这个文件吗？”系统弹出了提示框。",
    "《红楼梦》被认为是中国古典小说的巅峰之作。",
    "北京时间昨晚八点，神舟飞船成功发射，航天员状态良好。",
    "数据库连接池的大小应当根据并发请求数合理配置。",
    "海关总署公布的数据显示，上半年进出口总额同比增长。",
    "诸葛亮鞠躬尽瘁，死而后已，千百年来为人称颂。",
    "量子纠缠是一种奇特的物理现象，爱因斯坦称之为“鬼魅般的超距作用”。",
    "乌鲁木齐、呼和浩特和齐齐哈尔都是中国北方的重要城市。",
    "他嘟囔着抱怨天气太热，一边摇着蒲扇一边啃西瓜。",
    "苏轼的《水调歌头》写道：“但愿人长久，千里共婵娟。”",
    "瞧这小家伙，蹦蹦跳跳的，一刻也闲不住。",
]
MIXED = [
    "我们使用 Python 3.11 和 numpy 来处理数据，速度提升了 3 倍。",
    "请把 API key 写在环境变量 SILICONFLOW_API_KEY 里，不要提交到 GitHub。",
    "Qwen3-Embedding-8B 支持最长 32768 个 token 的输入。",
    "The meeting (会议) is scheduled for 2024年5月20日 at 10:00 AM.",
    "Error 429: 请求过于频繁 (rate limit exceeded), retry after 2s.",
]
EMOJI = ["😀", "👍", "🎉", "❤️", "🔥", "✅", "🚀", "😂", "🙏", "✨", "👨‍👩‍👧", "🇨🇳", "☕"]
MODULES = ("textwrap", "json.decoder", "heapq", "csv", "dataclasses", "statistics", "calendar")


def _paragraph(rng: random.Random, pool: Sequence[str], count: int, sep: str) -> str:
    return sep.join(rng.choice(pool) for _ in range(count))


def _csv(rng: random.Random) -> str:
    rows = ["id,date,amount,price,quantity,ratio,code"]
    for _ in range(rng.randint(3, 60)):
        date = f"20{rng.randint(10, 24)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
        rows.append(
            f"{rng.randint(1, 10**6)},{date},{rng.uniform(0, 1e5):.2f},"
            f"{rng.uniform(0, 500):.3f},{rng.randint(0, 999)},{rng.random():.6f},"
            f"{rng.randint(10**9, 10**10 - 1)}"
        )
    return "\n".join(rows)


def _numbers(rng: random.Random) -> str:
    return " ".join(str(rng.randint(0, 10 ** rng.randint(1, 12))) for _ in range(150))


def _emoji(rng: random.Random, pool: Sequence[str]) -> str:
    words = _paragraph(rng, pool, rng.randint(2, 20), " ").split(" ")
    return " ".join(w + (rng.choice(EMOJI) if rng.random() < 0.3 else "") for w in words)


def _docs(module: object) -> list[str]:
    found = [inspect.getdoc(module)] + [
        inspect.getdoc(obj) for obj in vars(module).values() if callable(obj)
    ]
    return [textwrap.fill(doc) for doc in found if doc and len(doc) > 200]


@cache
def corpus() -> dict[str, list[str]]:
    """Category -> about 40-120 documents of 50 to 5,000 characters, the same on every run."""
    rng = random.Random(2024)
    modules = [importlib.import_module(name) for name in MODULES]
    sources = [inspect.getsource(module) for module in modules]
    code = [s[i : i + rng.randint(300, 3000)] for s in sources for i in range(0, len(s), 3000)]
    english = [_paragraph(rng, ENGLISH, rng.randint(2, 40), " ") for _ in range(40)]
    english += [doc for module in modules for doc in _docs(module)][:60]
    pool = ENGLISH + CHINESE + MIXED
    mixed = [
        _paragraph(rng, pool, rng.randint(3, 30), rng.choice([" ", "\n", ""])) for _ in range(40)
    ]
    mixed += [
        json.dumps({"title": rng.choice(CHINESE), "body": rng.choice(ENGLISH)}, ensure_ascii=False)
        for _ in range(10)
    ]
    return {
        "english": english,
        "chinese": [_paragraph(rng, CHINESE, rng.randint(2, 50), "") for _ in range(50)],
        "code": code[:80],
        "numbers": [_csv(rng) for _ in range(25)] + [_numbers(rng) for _ in range(15)],
        "mixed": mixed,
        "emoji": [_emoji(rng, ENGLISH if i % 2 else CHINESE) for i in range(30)],
    }


@cache
def exact_counts(family: str) -> dict[str, list[int]]:
    return {name: bare(family).count(docs) for name, docs in corpus().items()}


# --- exact counts ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "text", "tokens"),
    [
        ("bert-en", "hello world", 2),  # two whole words, lower-cased
        ("bert-en", "Hello, World!", 4),  # punctuation splits
        ("bert-zh", "今天天气很好", 6),  # one token per hanzi
        ("bert-zh", "hello world", 2),
        ("qwen3", "hello world", 2),  # "hello", " world"
        ("qwen3", "12345", 5),  # Qwen splits digits one by one
        ("qwen3-vl", "hello world", 2),
        ("xlmr", "hello world", 3),  # "▁hell", "o", "▁world"
        ("xlmr", "今天天气很好", 3),  # "▁今天", "天气", "很好"
    ],
)
def test_exact_counts_of_known_strings(family: str, text: str, tokens: int) -> None:
    spec = spec_of(family)
    counter = counter_for(spec)
    assert counter.exact
    assert counter.count([text]) == [tokens + spec.special_tokens]


def test_special_tokens_are_the_specs() -> None:
    counts = {f: counter_for(spec_of(f)).count(["", "hello world"]) for f in MODEL_OF}
    assert counts == {
        "qwen3": [1, 3],  # <|endoftext|>
        "qwen3-vl": [19, 21],  # the chat template
        "xlmr": [2, 5],
        "bert-en": [2, 4],  # [CLS] [SEP]
        "bert-zh": [2, 4],
    }


def test_frozen_counts_guard_the_vendored_data() -> None:
    """Computed once with the upstream files; a change here means the vendored data changed."""
    got = {f: counter_for(spec_of(f)).count([SAMPLE, "今天天气很好", "12345"]) for f in MODEL_OF}
    assert got == {
        "bert-en": [30, 8, 4],
        "bert-zh": [37, 8, 3],
        "xlmr": [34, 5, 4],
        "qwen3": [33, 4, 6],
        "qwen3-vl": [51, 22, 24],
    }


def test_tokenizers_load_once_per_family() -> None:
    first = counter_for(spec_of("qwen3"))
    again = counter_for(spec_of("qwen3-vl"))
    assert isinstance(first, ExactCounter)
    assert isinstance(again, ExactCounter)
    assert first.tokenizer is again.tokenizer


# --- spans -----------------------------------------------------------------------------------

SPAN_TEXTS = [
    SAMPLE,
    "def f(x):\n    return x ** 2  # ok",
    "  leading and trailing  ",
    "👨‍👩‍👧 family, \ufdfa ligature, \u0958 composed, क़ decomposed, İstanbul",
    "",
]


def _check_spans(text: str, spans: list[tuple[int, int]], expected: int) -> None:
    assert len(spans) == expected
    starts, ends = [s for s, _ in spans], [e for _, e in spans]
    assert starts == sorted(starts)
    assert ends == sorted(ends)
    assert all(0 <= s <= e <= len(text) for s, e in spans)
    covered = {i for s, e in spans for i in range(s, e)}
    # Whitespace, control characters and combining marks (WordPiece strips accents) need no token.
    visible = {i for i, ch in enumerate(text) if unicodedata.category(ch)[0] not in "CZ"}
    visible -= {i for i, ch in enumerate(text) if ch.isspace() or unicodedata.category(ch) == "Mn"}
    assert visible <= covered


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("text", SPAN_TEXTS)
def test_exact_spans_are_tokens_in_order_and_cover_the_text(family: str, text: str) -> None:
    counter = bare(family)
    _check_spans(text, counter.spans(text), counter.count([text])[0])


@pytest.mark.parametrize("family", [*FAMILIES, None])
@pytest.mark.parametrize("text", SPAN_TEXTS)
def test_estimated_spans_match_the_estimate_and_tile_the_text(
    family: str | None, text: str
) -> None:
    estimator = CharClassEstimator(family=family)
    spans = estimator.spans(text)
    _check_spans(text, spans, estimator.count([text])[0])
    assert all(spans[i][1] == spans[i + 1][0] for i in range(len(spans) - 1))


def test_spans_cut_where_the_tokens_are() -> None:
    text = "hello world, 你好"
    assert bare("bert-zh").spans(text) == [(0, 5), (6, 11), (11, 12), (13, 14), (14, 15)]
    assert bare("qwen3").spans("hello world") == [(0, 5), (5, 11)]


# --- user tokenizer files ---------------------------------------------------------------------


def test_a_user_tokenizer_json_counts_exactly_and_is_never_truncated(tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(_tokenizers.bundled_tokenizer("bert-en").to_str())
    tokenizer.enable_truncation(max_length=4)  # as hub files often do: must not cap our count
    path = tmp_path / "tokenizer.json"
    tokenizer.save(str(path))
    long_text = " ".join(ENGLISH)
    expected = bare("bert-en").count([long_text])[0] + 3
    for name in (str(path), str(tmp_path)):  # the file, or the folder holding it
        spec = ModelSpec(
            name="m", max_input_tokens=512, default_dimensions=8, tokenizer=name, special_tokens=3
        )
        counter = counter_for(spec)
        assert counter.exact
        assert counter.count([long_text]) == [expected]


def test_an_unknown_tokenizer_name_is_a_config_error(tmp_path: Path) -> None:
    spec = replace(spec_of("bert-en"), tokenizer=str(tmp_path / "missing.json"))
    with pytest.raises(ConfigError, match=r"missing\.json"):
        counter_for(spec)


# --- the fallback ------------------------------------------------------------------------------


def test_without_the_tokenizers_package_the_estimator_counts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # "import tokenizers" now fails
    assert _tokenizers._import_tokenizers() is None
    for family in MODEL_OF:
        counter = counter_for(spec_of(family))
        assert isinstance(counter, CharClassEstimator)
        assert not counter.exact
        assert counter.count(["hello world"])[0] >= 2 + spec_of(family).special_tokens


def test_a_spec_without_tokenizer_gets_the_estimator_for_any_family() -> None:
    spec = ModelSpec(name="m", max_input_tokens=512, default_dimensions=8, special_tokens=2)
    counter = counter_for(spec)
    assert isinstance(counter, CharClassEstimator)
    assert counter.prices == _estimator._ANY_FAMILY


# --- the estimator against the exact counts ------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_the_estimator_never_undercounts_by_more_than_5_percent(family: str) -> None:
    estimator = CharClassEstimator(family=family)
    for category, docs in corpus().items():
        exact = exact_counts(family)[category]
        estimate = estimator.count(docs)
        ratios = [e / x for e, x in zip(estimate, exact, strict=True)]
        worst = min(range(len(docs)), key=ratios.__getitem__)
        assert ratios[worst] >= 0.95, (category, docs[worst][:200])
        assert sum(estimate) / sum(exact) < 1.6, category  # over-counts, but reasonably
        assert max(ratios) < 3, category


def test_the_any_family_estimator_is_above_every_family() -> None:
    estimator = CharClassEstimator()
    for category, docs in corpus().items():
        estimate = estimator.count(docs)
        for family in FAMILIES:
            exact = exact_counts(family)[category]
            assert all(e >= 0.95 * x for e, x in zip(estimate, exact, strict=True))
            assert sum(estimate) / sum(exact) < 2.5, (category, family)


def test_the_estimator_adds_special_tokens_and_keeps_texts_apart() -> None:
    estimator = CharClassEstimator(2, family="bert-en")
    texts = ["hello", "", "world", "hello world", "😀"]
    joined = estimator.count(texts)
    assert joined == [estimator.count([t])[0] for t in texts]
    assert joined[1] == 2
    assert estimator.count([]) == []


# --- the strict upper bound ------------------------------------------------------------------

EXPANDERS = [
    "\ufdfa",  # NFKC: 18 characters
    "\u0958\u0959",  # NFC: composition exclusions, two code points each
    "\U0001d160",  # musical symbol, decomposes into three
    "İstanbul",  # lower case: two characters
    "한국어",  # NFD: jamo
    "ﬁﬂ ㍿",  # ligatures, a square word
    "👨‍👩‍👧‍👦",
    "`",
    "e\u0301\u0302\u0303",
    "ԥﲐ╓禡Ⓤᇁ𝜾̈ӔΙ▸",  # XLM-R: the "ϊ" NFKC composes comes out as two tokens
]


def _adversarial(rng: random.Random) -> str:
    ranges = [(0x20, 0x7E), (0xA0, 0x24F), (0x300, 0x36F), (0x900, 0x97F), (0x1100, 0x11FF),
              (0x3000, 0x30FF), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0xF900, 0xFFEF),
              (0x1D100, 0x1D1FF), (0x1F300, 0x1FAFF)]  # fmt: skip
    chars = []
    for _ in range(rng.randint(1, 40)):
        low, high = rng.choice(ranges)
        chars.append(chr(rng.randint(low, high)))
    return "".join(chars)


@pytest.mark.parametrize("family", [*MODEL_OF, None])
def test_upper_bound_is_never_below_the_exact_count(family: str | None) -> None:
    rng = random.Random(99)
    texts = EXPANDERS + [_adversarial(rng) for _ in range(300)]
    texts += [doc for docs in corpus().values() for doc in docs[:10]]
    families = [family] if family else list(MODEL_OF)
    spec = ModelSpec(name="m", max_input_tokens=8, default_dimensions=8, special_tokens=2)
    for name in families:
        exact = counter_for(spec_of(name)).count(texts)
        checked = spec_of(name) if family else spec  # no family: the generic bound
        extra = 0 if family else 2 - spec_of(name).special_tokens
        bounds = [upper_bound(t, checked) - extra for t in texts]
        assert all(x <= b for x, b in zip(exact, bounds, strict=True)), name


def test_upper_bound_counts_characters_where_the_family_allows_it() -> None:
    assert upper_bound("hello", spec_of("bert-en")) == 5 + 2
    assert upper_bound("你好", spec_of("qwen3")) == 6 + 1  # byte-level: UTF-8 bytes
    assert upper_bound("你好", spec_of("xlmr")) == 2 + 1 + 2  # characters and the prefix
    assert upper_bound("你好", spec_of("bert-zh")) == 2 + 2
    assert upper_bound("\ufdfa", spec_of("xlmr")) >= 18 + 1 + 2


# --- off the event loop ----------------------------------------------------------------------


class ThreadRecorder:
    """A counter that records the threads it ran in."""

    exact = True

    def __init__(self) -> None:
        self.threads: set[int] = set()
        self.calls = 0

    def count(self, texts: Sequence[str]) -> list[int]:
        self.threads.add(threading.get_ident())
        self.calls += 1
        return [len(t) for t in texts]

    def spans(self, text: str) -> list[tuple[int, int]]:
        return [(i, i + 1) for i in range(len(text))]


async def test_count_async_counts_in_batches_off_the_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_tokenizers, "_BATCH_TEXTS", 7)
    recorder = ThreadRecorder()
    texts = [f"text {i}" * (i % 5) for i in range(50)]
    with ThreadPoolExecutor(2) as pool:
        counts = await count_async(recorder, texts, pool)
    assert counts == [len(t) for t in texts]
    assert recorder.calls == 8
    assert threading.get_ident() not in recorder.threads
    assert await count_async(recorder, []) == []


async def test_count_async_matches_count_for_real_counters() -> None:
    texts = corpus()["mixed"]
    for counter in (counter_for(spec_of("xlmr")), CharClassEstimator(1, family="qwen3")):
        assert await count_async(counter, texts) == counter.count(texts)


async def test_count_async_lets_the_loop_run() -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    await count_async(counter_for(spec_of("qwen3")), [" ".join(ENGLISH) * 5] * 64)
    task.cancel()
    assert ticks > 1


# --- calibration -----------------------------------------------------------------------------


def test_calibration_starts_at_one_for_exact_and_above_for_estimates() -> None:
    assert Calibration(exact=True).charge(1000) == 1000
    assert Calibration(exact=False).charge(1000) == 1060
    assert Calibration(exact=True).charge(0) == 0


def test_calibration_rises_with_the_first_sample_that_demands_it() -> None:
    calibration = Calibration(exact=True, min_sample=100)
    calibration.observe(1000, 1100)
    assert calibration.ratio == pytest.approx(1.1)
    assert calibration.charge(1000) == 1100


def test_calibration_never_charges_below_recent_evidence() -> None:
    calibration = Calibration(exact=True, window=4, min_sample=100, min_samples=1)
    for server in (1200, 900, 1000, 1100):
        calibration.observe(1000, server)
        assert calibration.charge(1000) >= 1200  # the 1.2 sample is still in the window
    calibration.observe(1000, 1000)  # the 1.2 sample leaves the window
    assert calibration.ratio == pytest.approx(1.1)
    for _ in range(4):
        calibration.observe(1000, 950)
    assert calibration.ratio == pytest.approx(0.95)  # tighter, as far as the evidence goes


def test_calibration_keeps_the_estimators_prior_until_enough_samples() -> None:
    calibration = Calibration(exact=False, min_sample=100, min_samples=3)
    calibration.observe(1000, 800)
    calibration.observe(1000, 800)
    assert calibration.ratio == Calibration.ESTIMATOR_PRIOR  # two samples cannot disprove it
    calibration.observe(1000, 800)
    assert calibration.ratio == pytest.approx(0.8)


def test_calibration_pools_small_responses() -> None:
    calibration = Calibration(exact=True, min_sample=256)
    calibration.observe(10, 20)  # one short text counted double: not yet evidence
    assert calibration.ratio == 1.0
    assert calibration.samples == 0
    calibration.observe(290, 290)
    assert calibration.ratio == pytest.approx(310 / 300)
    calibration.observe(0, 50)  # images only: nothing to compare
    assert calibration.samples == 1


def test_calibration_rejects_negative_counts() -> None:
    with pytest.raises(InputError):
        Calibration(exact=True).observe(-1, 5)
    with pytest.raises(ConfigError):
        Calibration(exact=True, window=0)


def test_base64_ids_do_not_fool_the_estimator() -> None:
    rng = random.Random(3)
    blob = base64.b64encode(bytes(rng.randrange(256) for _ in range(3000))).decode()
    for family in FAMILIES:
        assert CharClassEstimator(family=family).count([blob])[0] >= bare(family).count([blob])[0]


@pytest.mark.parametrize("family", ["xlmr", "qwen3", "bert-en"])
def test_a_long_text_is_tokenized_in_segments_with_the_whole_texts_tokens(family: str) -> None:
    rng = random.Random(3)
    words = ["alpha", "Beta", "gamma,", "delta.", "epsilon\n\n", "zeta  ", "eta!", "théta"]
    text = " ".join(rng.choice(words) for _ in range(40_000))  # about 250,000 characters
    assert len(_tokenizers.segments(text)) > 3
    counter = bare(family)
    whole = counter.tokenizer.encode(text, add_special_tokens=False)
    assert counter.count([text]) == [len(whole)]
    starts = ends = 0
    expected = []
    for start, end in whole.offsets:  # as spans() orders them: running maxima
        starts = max(starts, start)
        ends = max(ends, end, starts)
        expected.append((starts, ends))
    assert counter.spans(text) == expected


def test_segments_cover_the_text_and_cut_before_white_space() -> None:
    text = ("word " * 30_000) + ("字" * 200_000)
    bounds = _tokenizers.segments(text)
    assert bounds[0][0] == 0
    assert bounds[-1][1] == len(text)
    assert all(end == start for (_, end), (start, _) in itertools.pairwise(bounds))
    assert all(end - start <= 1 << 16 for start, end in bounds)
    spaced = [end for _, end in bounds if end < 150_000]
    assert spaced
    assert all(text[end] == " " and text[end - 1] != " " for end in spaced)


def test_the_class_table_filled_as_texts_come_classifies_as_the_whole_table_would() -> None:
    everything = np.arange(0x10000, dtype=np.uint32)
    rng = np.random.default_rng(5)
    shuffled = rng.permutation(everything)
    # In pieces and in any order, repeats included, each code point gets its own class.
    parts = [_estimator._bmp_classes(part) for part in np.array_split(shuffled, 7)]
    again = _estimator._bmp_classes(shuffled[:1000])
    whole = np.concatenate(parts)
    expected = np.array([_estimator._classify(int(code)) for code in shuffled], dtype=np.uint8)
    np.testing.assert_array_equal(whole, expected)
    np.testing.assert_array_equal(again, expected[:1000])
    assert _estimator._bmp_classes.UNKNOWN not in _estimator._bmp_classes.table


def test_new_code_points_are_classified_in_bulk_as_one_at_a_time() -> None:
    # The table may be filled already by other tests: the bulk rule is checked on its own,
    # over every BMP point and over a few out of order, against the rule for one point.
    everything = np.arange(0x10000, dtype=np.intp)
    one_by_one = np.array([_estimator._classify(code) for code in range(0x10000)], dtype=np.uint8)
    np.testing.assert_array_equal(_estimator._classified(everything), one_by_one)
    few = np.array([0xFE0F, 0x20, 0x4E00, 0x3042, 0xAC00, 0x0416, 0x0660, 0x9FFF, 0x7F, 0x85])
    np.testing.assert_array_equal(_estimator._classified(few), one_by_one[few])


_APART = {_estimator._DIGIT, _estimator._CJK, _estimator._KANA, _estimator._HANGUL}
_APART |= {_estimator._SYMBOL, _estimator._ASTRAL}  # the classes a space before is a token


def _estimate_by_hand(text: str, prices: _estimator._Prices) -> float:
    """The estimator's formula, character by character: the reference its numpy passes over
    whole blocks must match to the bit (the limiter charges by it)."""
    classes = [
        _estimator._ASTRAL if ord(char) > 0xFFFF else _estimator._classify(ord(char))
        for char in text
    ]
    runs = [(k, len(list(group))) for k, group in itertools.groupby(classes)]
    total, at = 0.0, 0
    for number, (kind, length) in enumerate(runs):
        chars = text[at : at + length]
        after = runs[number + 1][0] if number + 1 < len(runs) else _estimator._SEP
        uppers = sum("A" <= c <= "Z" for c in chars)
        humps = sum(
            "A" <= text[i] <= "Z" and "a" <= text[i - 1] <= "z"
            for i in range(max(at, 1), at + length)
        )
        price = prices.base[kind] + length * prices.rate[kind]
        price += uppers * prices.upper + humps * prices.hump
        if chars == " ":
            price = 0.0
        gap = kind == _estimator._SPACE and after in _APART
        joint = {kind, after} == {_estimator._LETTER, _estimator._DIGIT}
        total += price + (gap * prices.gap + joint * prices.joint)
        at += length
    return total + (prices.text if text else 0.0)


@pytest.mark.parametrize("family", [*FAMILIES, None])
def test_a_block_is_estimated_as_the_formula_gives_each_text_alone(family: str | None) -> None:
    rng = random.Random(13)
    alphabet = "aZ 0.,\t\n\r\x00\x7f-éß中。ア한😀\u0301\u00a0\u3000Ω\ufe0f𠀀€"
    for _ in range(150):
        ascii_only = rng.random() < 0.5
        pool = [c for c in alphabet if c.isascii()] if ascii_only else list(alphabet)
        texts = [
            "".join(rng.choices(pool, k=rng.choice([0, 1, 2, 7, 40])))
            for _ in range(rng.choice([1, 3, 20]))
        ]
        estimator = CharClassEstimator(2, family=family)
        expected = [
            math.ceil(max(_estimate_by_hand(t, p) for p in estimator.prices) - 1e-9) + 2
            for t in texts
        ]
        assert estimator.count(texts) == expected, texts
