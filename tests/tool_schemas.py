"""The tools and the reply schema the protocol tests ask for (OpenAI's, Anthropic's and
Ollama's routes each wrap them in their own shape)."""

WEATHER_TOOL = {
    "name": "get_weather",
    "description": "The current weather in a city",
    "parameters": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 30},
            "unit": {"enum": ["celsius", "fahrenheit"]},
        },
        "required": ["city"],
    },
}
TIME_TOOL = {
    "name": "get_time",
    "description": "The time now in a timezone",
    "parameters": {
        "type": "object",
        "properties": {"timezone": {"type": "string", "maxLength": 30}},
        "required": ["timezone"],
    },
}
CITY_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "population": {"type": "integer"},
    },
    "required": ["city", "population"],
    "additionalProperties": False,
}


def openai_tool(tool: dict) -> dict:
    """OpenAI's (and Ollama's) shape of a tool."""
    return {"type": "function", "function": tool}


def anthropic_tool(tool: dict) -> dict:
    """Anthropic's shape of a tool: the parameters are its ``input_schema``."""
    return {
        "name": tool["name"],
        "description": tool["description"],
        "input_schema": tool["parameters"],
    }
