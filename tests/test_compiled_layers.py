"""Compiled decoder layers (trainers/models.py: compile_decoder_layers) compute what the eager ones do.

On a GPU the layers are compiled by Inductor (fused kernels, the rounding of fused
arithmetic); here they are traced by the same compiler front end and run with the
`eager` backend, so the traced program must give the very same float64 numbers: the
loss, every gradient, under gradient checkpointing, with LoRA and in the packed layout.
"""

import warnings

import pytest
import torch

from twophase.data.base.compiling import compiled_or_eager
from twophase.trainers.models import compile_decoder_layers, enable_gradient_checkpointing

from test_dpo_layouts import _recipe, _run_step


@pytest.fixture(autouse=True)
def fresh_compiler():
    """Each test traces anew: the compiler would otherwise reuse code traced by an earlier test."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class TracingBackend:
    """A compiler backend that runs the traced graphs as they are, and counts them: proof that tracing happened."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, graph_module, example_inputs):
        self.graphs += 1
        return graph_module.forward


@pytest.mark.parametrize("layout", ["stacked", "packed_shared_prompt"])
def test_compiled_layers_give_the_same_dpo_loss_and_lora_gradients(tiny_model_dir, tmp_path, layout):
    eager = _run_step(_recipe(tiny_model_dir, tmp_path / "eager", layout), step=0)
    recipe = _recipe(tiny_model_dir, tmp_path / "compiled", layout)
    backend = TracingBackend()
    assert compile_decoder_layers(recipe.model, backend=backend) == 2
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="torch.compile failed")  # no silent fall-back to eager
        compiled = _run_step(recipe, step=0)
    assert backend.graphs >= 1
    assert compiled["loss"] == pytest.approx(eager["loss"], rel=1e-12)
    assert compiled["grads"].keys() == eager["grads"].keys() and len(eager["grads"]) > 0
    for name, grad in eager["grads"].items():
        torch.testing.assert_close(compiled["grads"][name], grad, rtol=1e-12, atol=1e-14)


def test_compiled_layers_give_the_same_full_fine_tuning_gradients_under_checkpointing(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 5, 9, 14, 3, 7, 22, 8], [1, 4, 4, 30, 12, 6, 2, 0]])
    mask = torch.tensor([[1] * 8, [1] * 7 + [0]])
    results, backend = [], TracingBackend()
    for compiled in (False, True):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64)
        enable_gradient_checkpointing(model)
        model.train()
        if compiled:
            compile_decoder_layers(model, backend=backend)
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="torch.compile failed")
            loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        results.append((float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert backend.graphs >= 1
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = results
    assert compiled_loss == pytest.approx(eager_loss, rel=1e-12)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-12, atol=1e-14)


def test_a_function_the_compiler_cannot_handle_runs_eagerly_after_one_warning(monkeypatch):
    def broken_compile(fn, **options):
        def fail(*args, **kwargs):
            raise torch._dynamo.exc.InternalTorchDynamoError("Cannot find a working triton installation")

        return fail

    monkeypatch.setattr(torch, "compile", broken_compile)
    square = compiled_or_eager(lambda x: x * x)
    with pytest.warns(UserWarning, match="torch.compile failed.*InternalTorchDynamoError.*running it eagerly"):
        assert float(square(torch.tensor(3.0))) == 9.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning: the eager function is used from now on
        assert float(square(torch.tensor(4.0))) == 16.0


def test_an_error_of_the_function_itself_is_not_taken_for_a_compiler_failure(monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda fn, **options: fn)
    with pytest.raises(ZeroDivisionError):
        compiled_or_eager(lambda x: 1 / 0)(torch.tensor(1.0))
