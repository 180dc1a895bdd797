import pytest

from src.errors import InvalidRequestError
from src.params import GenerationParams, make_params

pytestmark = pytest.mark.unit


def test_defaults_are_valid_and_sampled():
    params = GenerationParams()
    assert params.do_sample and not params.is_greedy


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"temperature": -0.5}, "temperature=-0.5"),
        ({"top_p": 0}, "top_p=0"),
        ({"top_k": -1}, "top_k=-1"),
        ({"max_new_tokens": -1}, "max_new_tokens=-1"),
        ({"presence_penalty": 2.5}, "presence_penalty=2.5"),
        ({"frequency_penalty": -3}, "frequency_penalty=-3"),
        ({"min_p": 1.5}, "min_p=1.5"),
        ({"logit_bias": {"5": 101}}, "bias 101.0 for token 5 is outside -100 to 100"),
        ({"logit_bias": {"-2": 1}}, "token id -2 is negative"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"top_logprobs": 21}, "top_logprobs=21"),
        ({"response_format": {"type": "json_schema"}}, "needs a JSON schema object"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"repetition_penalty": 0}, "repetition_penalty=0"),
        ({"seed": -3}, "seed=-3"),
        ({"temprature": 0.5}, "temprature: unknown parameter"),
        ({"stop": [""]}, "must not be empty"),
        ({"stop": ["x"] * 9}, "stop"),
        ({"do_sample": "sometimes"}, "do_sample='sometimes'"),
    ],
)
def test_invalid_parameters_are_named(values, expected):
    with pytest.raises(InvalidRequestError, match=expected):
        make_params(values)


@pytest.mark.parametrize("temperature", [1e-300, 1e-40, 0.009])
def test_a_near_zero_temperature_is_greedy(temperature):
    params = make_params({"temperature": temperature, "do_sample": True})
    assert params.temperature == 0.0 and params.is_greedy
    assert make_params({"temperature": 0.01}).temperature == 0.01


def test_cli_strings_are_parsed_and_a_single_stop_string_is_a_list():
    params = make_params({"temperature": "0.3", "do_sample": "false", "stop": "###"})
    assert params.temperature == 0.3
    assert params.do_sample is False and params.is_greedy
    assert params.stop == ("###",)


def test_updated_validates_and_keeps_other_values():
    params = GenerationParams(top_k=7)
    assert params.updated(temperature=0.0).top_k == 7
    assert params.updated(temperature=0.0).is_greedy
    with pytest.raises(InvalidRequestError, match="top_p"):
        params.updated(top_p=2)
