"""Limits of one session, all with defaults that a server flag can change."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SessionLimits:
    max_streams: int = 32  # live streams per session
    max_messages: int = 1024  # messages per request
    max_message_chars: int = 1_000_000  # characters of one message's content
    max_stream_id_chars: int = 128
    max_tokens_cap: int = 1_000_000  # a larger max_tokens is a mistake, not a request
    max_stop_sequences: int = 16
    max_stop_chars: int = 256  # per stop sequence: matching costs this much per token at most
    max_json_depth: int = 64  # nesting of a tool's parameters schema
    max_tools: int = 128
    max_replay_frames: int = 8192  # per stream; older frames cannot be replayed
    max_ended_streams: int = 64  # ended streams kept for replay, per session
    max_conversations: int = 32  # per session
    max_history_messages: int = 256  # per conversation; the oldest are dropped first
    max_history_chars: int = 2_000_000  # content kept per conversation; the oldest dropped first
    heartbeat_interval_s: float = 15.0  # a live stream silent this long gets a heartbeat
    stall_threshold_s: float = 2.0  # a gap between tokens longer than this is a stall
    ux_target_ttft_s: float = 1.0  # a first token within this is "satisfied" (docs/analytics.md)
