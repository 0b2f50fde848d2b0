"""Span attribute names: the one home of the keys phases write and trace readers (replay,
`trace show`) read back, as OpenTelemetry's semconv modules do. GenAI names follow the
OpenTelemetry GenAI semantic conventions; ours are under `orion.`.
"""

from typing import Final

# OpenTelemetry semantic conventions (error, GenAI).
ERROR_TYPE: Final = "error.type"
GEN_AI_OPERATION_NAME: Final = "gen_ai.operation.name"
GEN_AI_SYSTEM: Final = "gen_ai.system"
GEN_AI_REQUEST_MODEL: Final = "gen_ai.request.model"
GEN_AI_REQUEST_MAX_TOKENS: Final = "gen_ai.request.max_tokens"
GEN_AI_REQUEST_TEMPERATURE: Final = "gen_ai.request.temperature"
GEN_AI_REQUEST_TOP_P: Final = "gen_ai.request.top_p"
GEN_AI_REQUEST_TOP_K: Final = "gen_ai.request.top_k"
GEN_AI_USAGE_INPUT_TOKENS: Final = "gen_ai.usage.input_tokens"
GEN_AI_USAGE_OUTPUT_TOKENS: Final = "gen_ai.usage.output_tokens"
GEN_AI_RESPONSE_FINISH_REASONS: Final = "gen_ai.response.finish_reasons"
GEN_AI_SERVER_TIME_TO_FIRST_TOKEN: Final = "gen_ai.server.time_to_first_token"
GEN_AI_TOKEN_TYPE: Final = "gen_ai.token.type"

# The request and its phases.
REQUEST_ID: Final = "orion.request.id"
PHASE: Final = "orion.phase"
FINAL_STATE: Final = "orion.final_state"
REGISTRY_DIGEST: Final = "orion.registry.digest"
MESSAGES: Final = "orion.messages"
ERROR: Final = "orion.error"
ERROR_REASON: Final = "orion.error_reason"

# Routing and the agent that serves.
AGENT: Final = "orion.agent"
ATTEMPT: Final = "orion.attempt"
ROUTING_SOURCE: Final = "orion.routing.source"
ROUTING_SCORE: Final = "orion.routing.score"
ROUTING_RUNNER_UP: Final = "orion.routing.runner_up"
ROUTING_MARGIN: Final = "orion.routing.margin"
ROUTING_DEGRADED: Final = "orion.routing.degraded"
ROUTING_NOTE: Final = "orion.routing.note"
# The embedding batch of the request's text: its size, the wait, whether the window held it.
ROUTING_BATCH_SIZE: Final = "orion.routing.batch.size"
ROUTING_BATCH_WAIT_MS: Final = "orion.routing.batch.wait_ms"
ROUTING_BATCH_WINDOWED: Final = "orion.routing.batch.windowed"
FALLBACK_CHAIN: Final = "orion.fallback_chain"
FALLBACK: Final = "orion.fallback"
FALLBACK_FROM: Final = "orion.fallback.from"
FALLBACK_TO: Final = "orion.fallback.to"
FALLBACK_CAUSE: Final = "orion.fallback.cause"

# Caches.
CACHE_LEVEL: Final = "cache.level"
CACHE_L1: Final = "cache.l1"
CACHE_L1_WAITED: Final = "cache.l1.waited"
CACHE_L3: Final = "cache.l3"

# Breakers, guards and failures.
BREAKER: Final = "orion.breaker"
BREAKER_TRANSITION: Final = "orion.breaker.transition"
BREAKER_KEY: Final = "orion.breaker.key"  # the model instance the agent's breaker guards
BREAKER_PROBE: Final = "orion.breaker.probe"  # the attempt is a half-open probe
RETRY_SAME: Final = "orion.retry.same"  # backoff (s) before retrying the same agent
RETRY_SKIPPED: Final = "orion.retry.skipped"  # why a transient failure was not retried
RETRY_AFTER: Final = "orion.retry_after_s"  # every breaker refused: when one lets a probe in
# For each next agent on the model that just failed, "try" or "skip": was there time to
# queue for that model again
FALLBACK_SAME_MODEL: Final = "orion.fallback.same_model"
FALLBACK_SKIPPED: Final = "orion.fallback.skipped"  # agents passed over for lack of time
LOAD_ERROR: Final = "orion.load_error"
INFERENCE_ERROR: Final = "orion.inference_error"
GUARD_REPETITION: Final = "orion.guard.repetition"

# Structured output (response_format, tools): what the mask enforced and what it cost.
GEN_AI_OUTPUT_TYPE: Final = "gen_ai.output.type"  # json | text
OUTPUT_FORMAT: Final = "orion.output.format"  # json_schema | json_object | regex | grammar | tools
OUTPUT_GRAMMAR_DIGEST: Final = "orion.output.grammar_digest"
OUTPUT_MASK_FORCED: Final = "orion.output.mask_forced"  # steps where the model's best was refused
OUTPUT_MASK_MS_P50: Final = "orion.output.mask_ms_p50"
OUTPUT_REJECTED: Final = "orion.output.rejected"  # why the finished output failed its check
OUTPUT_TOOL_CALLS: Final = "orion.output.tool_calls"  # names of the tools called
GUARDRAILS_FINDINGS: Final = "orion.guardrails.findings"
GUARDRAILS_BLOCKED: Final = "orion.guardrails.blocked"
GUARDRAILS_RULES: Final = "orion.guardrails.rules"
# A special token of the agent's vocabulary written in the request's text (replay reads it).
GUARDRAILS_SPECIAL_TOKEN: Final = "orion.guardrails.special_token"

# The model a request was served by (see LoadInfo.span_attributes).
MODEL: Final = "orion.model"
MODEL_VARIANT: Final = "orion.model.variant"
MODEL_SHA256: Final = "orion.model.sha256"
MODEL_LOADED_NOW: Final = "orion.model.loaded_now"
MODEL_LOAD_MS: Final = "orion.model.load_ms"
MODEL_ESTIMATE_MB: Final = "orion.model.estimate_mb"
MODEL_UNLOADED: Final = "orion.model.unloaded"
MODEL_PRELOADED: Final = "orion.model.preloaded"
MODEL_SHARDS: Final = "orion.model.shards"  # parts of a sharded model (0: one file)
# One part of a sharded model assembled by the loader (span "orion.model.shard").
SHARD_INDEX: Final = "orion.shard.index"
SHARD_COUNT: Final = "orion.shard.count"
SHARD_BYTES: Final = "orion.shard.bytes"
SHARD_TENSORS: Final = "orion.shard.tensors"
SHARD_LOAD_MS: Final = "orion.shard.load_ms"
# The slot (model instance) that served it: which, how long the request waited for it, how
# many prompt tokens its context already held, and how many slots the model may have.
SLOT: Final = "orion.slot"
SLOT_WAIT_MS: Final = "orion.slot.wait_ms"
SLOT_REUSED_TOKENS: Final = "orion.slot.reused_tokens"
SLOT_PARALLEL: Final = "orion.slot.parallel"
# Why a generation failed, when the agent's attempt failed (e.g. "stalled").
INFERENCE_FAILURE: Final = "orion.inference.failure"
SESSION_ID: Final = "orion.session.id"
SESSION_TRIMMED: Final = "orion.session.trimmed_messages"
PREFILLED_TOKENS: Final = "orion.prefilled_tokens"

# Retrieval from a context store (the `retrieving` phase and the prompt it feeds).
CONTEXT_STORE: Final = "orion.context.store"
CONTEXT_RETRIEVED: Final = "orion.context.retrieved"  # chunk ids found, best first
CONTEXT_RERANKED: Final = "orion.context.reranked"  # a model reread and reordered them
CONTEXT_CHUNKS: Final = "orion.context.chunks"  # chunk ids put into the prompt
CONTEXT_DOCUMENTS: Final = "orion.context.documents"
CONTEXT_TOKENS: Final = "orion.context.tokens"

# A virtual agent (serving_virtual, its regions, fusing): members, weights, outcomes, early
# stop (decision, confidence) and what the fused answer used.
VIRTUAL_MEMBERS: Final = "orion.virtual.members"  # member agents, in role order
VIRTUAL_WEIGHTS: Final = "orion.virtual.weights"  # their fusion weights, same order
VIRTUAL_OUTCOMES: Final = "orion.virtual.outcomes"  # "role: done|failed|stopped"
VIRTUAL_SERVED: Final = "orion.virtual.served"  # member agents that answered
VIRTUAL_CONFIDENCE: Final = "orion.virtual.confidence"  # geometric mean token probability
VIRTUAL_EARLY_STOP: Final = "orion.virtual.early_stop"  # why it was taken or not
VIRTUAL_EARLY_STOP_TAKEN: Final = "orion.virtual.early_stop.taken"
# when the verdict was taken: the judged answer's tokens, ms since the request started
VIRTUAL_EARLY_STOP_AT_TOKEN: Final = "orion.virtual.early_stop.at_token"
VIRTUAL_EARLY_STOP_AT_MS: Final = "orion.virtual.early_stop.at_ms"
VIRTUAL_CODE_AT: Final = "orion.virtual.code_at"  # the judged answer's first code fence (token)
# leader_first: when each follower started ("role: why"; never: the leader's early stop)
VIRTUAL_JOINS: Final = "orion.virtual.joins"
VIRTUAL_STRATEGY: Final = "orion.virtual.strategy"
VIRTUAL_USED: Final = "orion.virtual.used"  # member agents whose answers the text holds
