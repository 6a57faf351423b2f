"""After training, the prompt as training saw it: the tokens ``dtune generate`` feeds, and the prompt settings an
adapter folder carries (``prompt_format.json``) when it is used away from its run."""

from __future__ import annotations

import copy

import pytest
import torch

from dtune.commands.generate import generate
from dtune.data import Renderer
from dtune.data.formats import row_from_obj
from dtune.schema import DataConfig


class Recorder(torch.nn.Module):
    """Stands in for the model: records the ids generate feeds and answers with eos at once."""

    def __init__(self, eos: int) -> None:
        super().__init__()
        self.eos, self.fed = eos, []
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # generate reads the device off a parameter

    def generate(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        self.fed.append(input_ids[0].tolist())
        return torch.cat([input_ids, torch.tensor([[self.eos]])], dim=1)


def appending_eos(tokenizer):
    """The test tokenizer made an add_eos_token one: BOS before and EOS after every text encoded with special tokens."""
    from tokenizers import processors

    tok = copy.deepcopy(tokenizer)
    bos, eos = "<|im_start|>", tok.eos_token
    tok.bos_token = bos
    ids = [(bos, tok.convert_tokens_to_ids(bos)), (eos, tok.convert_tokens_to_ids(eos))]
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single=f"{bos} $A {eos}", special_tokens=ids)
    return tok


@pytest.mark.parametrize("chat_template", [True, False])
def test_generate_feeds_the_prompt_tokens_training_put_before_the_answer(tokenizer, chat_template: bool):
    """An add_eos_token tokenizer appends EOS to every text encoded with special tokens: training keeps it off the
    prompt of an untemplated row (BOS, prompt, answer, EOS), so generate must not feed ``BOS prompt EOS`` either."""
    tok = appending_eos(tokenizer)
    renderer = Renderer(tok, DataConfig(chat_template=chat_template, choices=None))
    prompt = "Review: good. Sentiment:"
    example = renderer(row_from_obj({"prompt": prompt, "completion": " positive"}, "r:1", "prompt_completion"))
    model = Recorder(tok.eos_token_id)
    generate(model, renderer, [prompt], max_new_tokens=2)
    assert model.fed == [example.input_ids[: example.prompt_len]]
    assert model.fed[0][-1] != tok.eos_token_id


@pytest.mark.parametrize("data", [{"system_prompt": "Answer in one word."}, {"chat_template": False}, {"format": "text"}])
def test_an_adapter_folder_away_from_its_run_renders_prompts_as_its_run_did(tokenizer, tmp_path, data: dict):
    """An adapter folder copied away from its run (no config beside it) carries prompt_format.json; generate, eval and
    merge must render prompts as it says (system prompt, chat template or plain text), not with the defaults."""
    from safetensors.torch import save_file

    from dtune.adapters import locate
    from dtune.checkpoint import export_prompt_format
    from dtune.commands.generate import render
    from dtune.schema import DtuneConfig

    trained = DtuneConfig()
    for key, value in data.items():
        setattr(trained.data, key, value)
    adapter = tmp_path / "shared-adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA", "base_model_name_or_path": "builtin:tiny-llama"}')
    save_file({}, str(adapter / "adapter_model.safetensors"))
    export_prompt_format(trained, tokenizer, adapter)
    cfg = locate(adapter).cfg
    ran, now = Renderer(tokenizer, trained.data), Renderer(tokenizer, cfg.data)
    assert render(now, "Hi", cfg.data.system_prompt) == render(ran, "Hi", trained.data.system_prompt)
