from twisted.application.service import ServiceMaker

openaiForward = ServiceMaker(
    "openai-forward", "fwd.tap", "Forward and stream OpenAI API traffic with a shared key pool", "openai-forward"
)
