"""The server's own routes, one ``APIRouter`` per protocol (as KServe and vLLM lay theirs out):
``openai`` (completions, chat, models) and ``repository`` (the model repository extension with
parameters: load, unload, promote, rollback, index). KServe V1/V2 are kserve's own routes on
:class:`~autoglm_inference.kserve_model.CausalLMModel`."""
