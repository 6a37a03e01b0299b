"""`JobStreams` on Redis Streams: one consumer of the group reading Lobby's jobs.

Keys (stream names are used verbatim, other keys carry the prefix):

- the two job streams, read through one consumer group;
- the results and dead-letter streams, trimmed with `MAXLEN ~`;
- `{prefix}consumer:{group}:{name}`: a consumer's presence, a random token
  with a TTL that the live consumer keeps renewing;
- `{prefix}answered:{stream}:{entry_id}`: set when a job is answered, kept
  for `answered_ttl`, so a job seen again is never answered twice.

`pending_jobs` (what `ExplainRuntime` shows of a game's unanswered jobs)
reads the group's pending entries and the entries after its last-delivered
id in one script, at most a bounded number of each per stream.

Every step that must not interleave with another consumer is one Lua script
(Redis runs scripts atomically): answering (publish + remember + XACK, only
while the entry is pending on us), claiming (only entries still pending on
the consumer they were found on, and for another consumer only while it has
no presence) and removing idle consumers (only without presence and with
nothing pending, since deleting a consumer drops its pending entries).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, cast

import redis

from rtmanager.adapters.redis.client import DELETE_IF_OURS, RENEW_IF_OURS, UNAVAILABLE_ERRORS
from rtmanager.domain.errors import ServiceUnavailable
from rtmanager.domain.jobs import JobKind, LobbyJob, PendingJob
from rtmanager.ports import AnswerOutcome, JobEntry, PendingJobs

if TYPE_CHECKING:
    from rtmanager.ports import JobStreams

log = logging.getLogger(__name__)

# KEYS: job stream, target stream, answered marker.
# ARGV: group, consumer, entry id, maxlen, marker ttl ms, require pending
# ("1"/"0"), then the answer's field/value pairs.
# Returns 1 answered, 2 answered before (acknowledged now), 0 not ours.
_ANSWER = """
if redis.call('EXISTS', KEYS[3]) == 1 then
    redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
    return 2
end
if ARGV[6] == '1' then
    local held = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1, ARGV[2])
    if #held == 0 then
        return 0
    end
end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', unpack(ARGV, 7))
redis.call('SET', KEYS[3], '1', 'PX', ARGV[5])
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
return 1
"""

# KEYS: job stream, presence key of the consumer the entries are taken
# from, dead-letter stream.
# ARGV: group, new owner, current owner, min idle ms, require absent
# presence ("1"/"0"), dead-letter maxlen, answered-marker prefix, marker
# ttl ms, then entry ids.
# Returns {claimed entries, ids dead-lettered here}. An entry no longer
# pending on the current owner is left alone. An entry deleted or trimmed
# from its stream while pending cannot be applied (its fields are gone):
# it is dead-lettered and acknowledged right here, in the same atomic step,
# so it still gets exactly one answer.
_CLAIM = """
if ARGV[5] == '1' and redis.call('EXISTS', KEYS[2]) == 1 then
    return {{}, {}}
end
local claimed, vanished = {}, {}
for i = 9, #ARGV do
    local id = ARGV[i]
    local held = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1, ARGV[3])
    if #held == 1 and tonumber(held[1][3]) >= tonumber(ARGV[4]) then
        if #redis.call('XRANGE', KEYS[1], id, id) == 0 then
            local marker = ARGV[7] .. KEYS[1] .. ':' .. id
            if redis.call('EXISTS', marker) == 0 then
                redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[6], '*',
                    'stream', KEYS[1], 'job_id', id,
                    'reason', 'the entry was deleted from its stream before it was answered',
                    'deliveries', tostring(held[1][4]), 'fields', '{}')
                redis.call('SET', marker, '1', 'PX', ARGV[8])
            end
            redis.call('XACK', KEYS[1], ARGV[1], id)
            table.insert(vanished, id)
        else
            local got = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id)
            if #got == 1 then
                table.insert(claimed, got[1])
            end
        end
    end
end
return {claimed, vanished}
"""

# KEYS: job stream, presence key. ARGV: group, consumer, min idle ms.
_REMOVE_IDLE_CONSUMER = """
if redis.call('EXISTS', KEYS[2]) == 1 then
    return 0
end
for _, fields in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
    local info = {}
    for i = 1, #fields, 2 do
        info[fields[i]] = fields[i + 1]
    end
    if info['name'] == ARGV[2] then
        if tonumber(info['pending']) == 0 and tonumber(info['idle']) >= tonumber(ARGV[3]) then
            redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
            return 1
        end
        return 0
    end
end
return 0
"""

# KEYS: the job streams. ARGV: group, game id, scan bound.
# Returns, per stream: {truncated (0/1), entries of the game}, each entry
# {id, consumer, idle ms, deliveries, fields}; an entry not delivered yet has
# consumer "", idle -1 and 0 deliveries. One script, so both kinds come from
# one moment: an entry cannot move from undelivered to pending between them.
_PENDING_OF_GAME = """
local function of_game(fields)
    for i = 1, #fields, 2 do
        if fields[i] == 'game_id' then
            return fields[i + 1] == ARGV[2]
        end
    end
    return false
end
local limit = tonumber(ARGV[3])
local result = {}
for k = 1, #KEYS do
    local stream = KEYS[k]
    local found, truncated = {}, 0
    local groups = redis.pcall('XINFO', 'GROUPS', stream)
    if type(groups) == 'table' and groups.err == nil then
        local last = nil
        for _, group in ipairs(groups) do
            local info = {}
            for i = 1, #group, 2 do
                info[group[i]] = group[i + 1]
            end
            if info['name'] == ARGV[1] then
                last = info['last-delivered-id']
            end
        end
        if last then
            local pending = redis.call('XPENDING', stream, ARGV[1], '-', '+', limit)
            if #pending >= limit then
                truncated = 1
            end
            for _, held in ipairs(pending) do
                local entry = redis.call('XRANGE', stream, held[1], held[1])
                if #entry == 1 and of_game(entry[1][2]) then
                    table.insert(found, {held[1], held[2], held[3], held[4], entry[1][2]})
                end
            end
        else
            last = '0-0'  -- no group yet: it will read the stream from its start
        end
        local fresh = redis.call('XRANGE', stream, '(' .. last, '+', 'COUNT', limit)
        if #fresh >= limit then
            truncated = 1
        end
        for _, entry in ipairs(fresh) do
            if of_game(entry[2]) then
                table.insert(found, {entry[1], '', -1, 0, entry[2]})
            end
        end
    end
    table.insert(result, {truncated, found})
end
return result
"""

_PENDING_PAGE = 100


@dataclass(frozen=True)
class JobStreamsConfig:
    """Names and limits of the job streams (stream names are used verbatim)."""

    start_stream: str
    stop_stream: str
    results_stream: str
    dead_letter_stream: str
    group: str
    consumer: str
    prefix: str = ""
    results_maxlen: int = 100_000
    dead_letter_maxlen: int = 100_000
    presence_ttl: timedelta = timedelta(seconds=10)
    answered_ttl: timedelta = timedelta(hours=24)

    def __post_init__(self) -> None:
        names = [self.start_stream, self.stop_stream, self.results_stream, self.dead_letter_stream]
        if any(not name.strip() for name in [*names, self.group, self.consumer]):
            raise ValueError("job streams: stream, group and consumer names must not be empty")
        if len(set(names)) != len(names):
            raise ValueError("job streams: the four stream names must differ")
        if min(self.results_maxlen, self.dead_letter_maxlen) < 1:
            raise ValueError("job streams: trimmed lengths must be at least 1")
        if min(self.presence_ttl, self.answered_ttl) < timedelta(milliseconds=1):
            raise ValueError("job streams: presence and answered ttls must be positive")


class RedisJobStreams:
    """`JobStreams` for one named consumer (see the module docstring for the keys)."""

    def __init__(self, client: redis.Redis, config: JobStreamsConfig) -> None:
        self._client = client
        self._config = config
        self._kinds = {config.start_stream: JobKind.START, config.stop_stream: JobKind.STOP}
        self._streams = {JobKind.START: config.start_stream, JobKind.STOP: config.stop_stream}
        self._token = secrets.token_urlsafe(18)
        self._answer = client.register_script(_ANSWER)
        self._claim = client.register_script(_CLAIM)
        self._remove_idle = client.register_script(_REMOVE_IDLE_CONSUMER)
        self._pending_of_game = client.register_script(_PENDING_OF_GAME)
        self._renew = client.register_script(RENEW_IF_OURS)
        self._release = client.register_script(DELETE_IF_OURS)

    @property
    def config(self) -> JobStreamsConfig:
        """The names and limits this adapter uses."""
        return self._config

    def presence_key(self, consumer: str) -> str:
        """The Redis key of a consumer's presence."""
        return f"{self._config.prefix}consumer:{self._config.group}:{consumer}"

    def answered_key(self, job: LobbyJob) -> str:
        """The Redis key remembering that `job` was answered."""
        return f"{self._config.prefix}answered:{job.stream}:{job.entry_id}"

    # -- the group and this consumer's name ----------------------------------------

    def ensure_groups(self) -> None:
        """Create the consumer group on both job streams (from the start) unless it exists."""
        with self._unavailable("create the job stream consumer groups"):
            for stream in self._streams.values():
                try:
                    self._client.xgroup_create(stream, self._config.group, id="0", mkstream=True)
                except redis.exceptions.ResponseError as error:
                    if "BUSYGROUP" not in str(error):
                        raise

    def claim_name(self) -> bool:
        """Take this consumer's presence; False while another live process holds it."""
        key = self.presence_key(self._config.consumer)
        with self._unavailable("register the stream consumer"):
            if self._client.set(key, self._token, nx=True, px=self._presence_ms()):
                return True
            return _text(self._client.get(key)) == self._token

    def keep_name(self) -> bool:
        """Renew this consumer's presence; False when it had expired or was taken."""
        key = self.presence_key(self._config.consumer)
        with self._unavailable("renew the stream consumer's presence"):
            return bool(self._renew(keys=[key], args=[self._token, self._presence_ms()]))

    def release_name(self) -> None:
        """Drop this consumer's presence if it is still ours."""
        key = self.presence_key(self._config.consumer)
        with self._unavailable("release the stream consumer's presence"):
            self._release(keys=[key], args=[self._token])

    # -- reading and claiming --------------------------------------------------------

    def redeliver_own(self, kind: JobKind, after: str, count: int) -> list[JobEntry]:
        """Entries of the `kind` stream pending on this consumer with ids > `after`."""
        stream = self._streams[kind]
        me = self._config.consumer
        with self._unavailable("re-read this consumer's pending jobs"):
            while True:
                rows = self._pending(stream, me, start=f"({after}" if after else "-", count=count)
                if not rows:
                    return []
                entries = self._claim_rows(
                    stream, rows, owner=me, min_idle_ms=0, require_absent=False
                )
                if entries:
                    return entries
                # Every entry of the page had been deleted (and is now
                # dead-lettered): go on past it.
                after = _text(rows[-1]["message_id"]) or ""

    def read_new(self, count: int, block: timedelta) -> list[JobEntry]:
        """New entries of both job streams (first deliveries), waiting up to `block`."""
        block_ms = max(1, int(block.total_seconds() * 1000))
        with self._unavailable("read the job streams"):
            try:
                response = self._client.xreadgroup(
                    self._config.group,
                    self._config.consumer,
                    dict.fromkeys(self._streams.values(), ">"),
                    count=count,
                    block=block_ms,
                )
            except redis.exceptions.ResponseError as error:
                if "NOGROUP" not in str(error):
                    raise
                # The stream or group was deleted behind our back.
                self.ensure_groups()
                return []
        entries: list[JobEntry] = []
        for stream, items in _by_stream(response).items():
            kind = self._kinds[stream]
            for entry_id, fields in items:
                job = LobbyJob(kind=kind, stream=stream, entry_id=entry_id)
                entries.append(JobEntry(job=job, fields=fields, deliveries=1))
        return entries

    def claim_abandoned(self, min_idle: timedelta, count: int) -> list[JobEntry]:
        """Take entries idle for `min_idle` on consumers that have no presence."""
        min_idle_ms = max(0, int(min_idle.total_seconds() * 1000))
        me = self._config.consumer
        taken: list[JobEntry] = []
        with self._unavailable("take over abandoned jobs"):
            for stream in self._streams.values():
                for owner in self._pending_consumers(stream):
                    if owner == me or len(taken) >= count:
                        continue
                    if self._client.exists(self.presence_key(owner)):
                        continue
                    rows = self._pending(
                        stream, owner, start="-", count=count - len(taken), idle_ms=min_idle_ms
                    )
                    if rows:
                        taken += self._claim_rows(
                            stream, rows, owner=owner, min_idle_ms=min_idle_ms, require_absent=True
                        )
        return taken

    # -- answering -------------------------------------------------------------------

    def answer(
        self, entry: JobEntry, fields: Mapping[str, str], *, dead_letter: bool = False
    ) -> AnswerOutcome:
        """Publish the answer and acknowledge the entry atomically (see `AnswerOutcome`)."""
        config = self._config
        target, maxlen = (
            (config.dead_letter_stream, config.dead_letter_maxlen)
            if dead_letter
            else (config.results_stream, config.results_maxlen)
        )
        pairs = [part for item in fields.items() for part in item]
        with self._unavailable("answer a job"):
            try:
                reply = self._answer(
                    keys=[entry.stream, target, self.answered_key(entry.job)],
                    args=[
                        config.group,
                        config.consumer,
                        entry.entry_id,
                        maxlen,
                        self._answered_ms(),
                        "1",
                        *pairs,
                    ],
                )
            except redis.exceptions.ResponseError as error:
                if "NOGROUP" not in str(error):
                    raise
                self.ensure_groups()
                return AnswerOutcome.NOT_OURS  # the group is new: nothing is pending
        return {1: AnswerOutcome.ANSWERED, 2: AnswerOutcome.ALREADY_ANSWERED}.get(
            int(cast("int", reply)), AnswerOutcome.NOT_OURS
        )

    # -- housekeeping ----------------------------------------------------------------

    def remove_idle_consumers(self, min_idle: timedelta) -> list[str]:
        """Delete consumers idle for `min_idle` with no presence and nothing pending."""
        min_idle_ms = int(min_idle.total_seconds() * 1000)
        removed: list[str] = []
        with self._unavailable("remove idle stream consumers"):
            for stream in self._streams.values():
                try:
                    consumers = cast(
                        "list[dict[Any, Any]]",
                        self._client.xinfo_consumers(stream, self._config.group),
                    )
                except redis.exceptions.ResponseError:
                    continue  # no such stream or group yet
                for info in consumers:
                    name = _text(_field(info, "name"))
                    if name is None or name == self._config.consumer:
                        continue
                    if int(_field(info, "pending") or 0) or int(_field(info, "idle") or 0) < (
                        min_idle_ms
                    ):
                        continue
                    if self._remove_idle(
                        keys=[stream, self.presence_key(name)],
                        args=[self._config.group, name, min_idle_ms],
                    ):
                        removed.append(name)
        return sorted(set(removed))

    def lag(self) -> dict[str, int]:
        """Entries of each job stream the group has not read yet (where Redis knows)."""
        lags: dict[str, int] = {}
        with self._unavailable("measure the job streams' lag"):
            for stream in self._streams.values():
                try:
                    groups = cast("list[dict[Any, Any]]", self._client.xinfo_groups(stream))
                except redis.exceptions.ResponseError:
                    continue
                for group in groups:
                    lag = _field(group, "lag")
                    if _text(_field(group, "name")) == self._config.group and isinstance(lag, int):
                        lags[stream] = lag
        return lags

    def pending_jobs(self, game_id: str, scan: int) -> PendingJobs:
        """The game's jobs the group has not acknowledged (see the port), from one script."""
        if scan < 1:
            raise ValueError(f"the scan bound must be at least 1, got {scan}")
        streams = [self._streams[JobKind.START], self._streams[JobKind.STOP]]
        with self._unavailable("read the job streams' unanswered jobs"):
            reply = cast(
                "list[Any]",
                self._pending_of_game(keys=streams, args=[self._config.group, game_id, scan]),
            )
        jobs: list[PendingJob] = []
        truncated = False
        for stream, (stream_truncated, entries) in zip(streams, reply, strict=True):
            truncated = truncated or bool(stream_truncated)
            for raw_id, raw_consumer, idle_ms, deliveries, raw_fields in entries or []:
                fields = {
                    _text(key) or "": _text(value) or ""
                    for key, value in _pairs(raw_fields).items()
                }
                jobs.append(
                    PendingJob(
                        job=LobbyJob(self._kinds[stream], stream, _text(raw_id) or ""),
                        fields=fields,
                        consumer=_text(raw_consumer) or "",
                        deliveries=int(deliveries),
                        idle=timedelta(milliseconds=int(idle_ms)) if int(idle_ms) >= 0 else None,
                    )
                )
        jobs.sort(key=lambda pending: pending.job.position)
        return PendingJobs(jobs, truncated)

    # -- helpers ---------------------------------------------------------------------

    def _answered_ms(self) -> int:
        return max(1, int(self._config.answered_ttl.total_seconds() * 1000))

    def _presence_ms(self) -> int:
        return max(1, int(self._config.presence_ttl.total_seconds() * 1000))

    def _pending_consumers(self, stream: str) -> list[str]:
        try:
            summary = cast("dict[str, Any]", self._client.xpending(stream, self._config.group))
        except redis.exceptions.ResponseError:
            return []  # no such stream or group yet
        return [_text(c["name"]) or "" for c in summary.get("consumers") or []]

    def _pending(
        self, stream: str, consumer: str, *, start: str, count: int, idle_ms: int | None = None
    ) -> list[dict[str, Any]]:
        try:
            return cast(
                "list[dict[str, Any]]",
                self._client.xpending_range(
                    stream,
                    self._config.group,
                    min=start,
                    max="+",
                    count=min(count, _PENDING_PAGE),
                    consumername=consumer,
                    idle=idle_ms,
                ),
            )
        except redis.exceptions.ResponseError as error:
            if "NOGROUP" not in str(error):
                raise
            return []

    def _claim_rows(
        self,
        stream: str,
        rows: list[dict[str, Any]],
        *,
        owner: str,
        min_idle_ms: int,
        require_absent: bool,
    ) -> list[JobEntry]:
        config = self._config
        deliveries = {_text(row["message_id"]) or "": int(row["times_delivered"]) for row in rows}
        reply = cast(
            "list[Any]",
            self._claim(
                keys=[stream, self.presence_key(owner), config.dead_letter_stream],
                args=[
                    config.group,
                    config.consumer,
                    owner,
                    min_idle_ms,
                    "1" if require_absent else "0",
                    config.dead_letter_maxlen,
                    f"{config.prefix}answered:",
                    self._answered_ms(),
                    *deliveries.keys(),
                ],
            ),
        )
        claimed, vanished = reply[0] or [], reply[1] or []
        kind = self._kinds[stream]
        entries: list[JobEntry] = []
        for raw_id, raw_fields in claimed:
            entry_id = _text(raw_id) or ""
            fields = _pairs(raw_fields)
            job = LobbyJob(kind=kind, stream=stream, entry_id=entry_id)
            # The claim itself is one more delivery.
            entries.append(JobEntry(job, fields, deliveries.get(entry_id, 0) + 1))
        if vanished:
            log.warning(
                "pending jobs were deleted from their stream; dead-lettered",
                extra={"stream": stream, "job_ids": [_text(i) for i in vanished]},
            )
        entries.sort(key=lambda entry: entry.job.position)
        return entries

    @contextmanager
    def _unavailable(self, action: str) -> Iterator[None]:
        try:
            yield
        except UNAVAILABLE_ERRORS as error:
            raise ServiceUnavailable(
                f"redis unavailable: cannot {action}: {type(error).__name__}: {error}",
                metadata={"dependency": "redis"},
            ) from error


def _by_stream(response: Any) -> dict[str, list[tuple[str, dict[bytes, bytes]]]]:
    """XREADGROUP's reply as {stream: [(id, fields), ...]} (RESP2 list or RESP3 map)."""
    if not response:
        return {}
    if isinstance(response, dict):
        items: list[tuple[Any, Any]] = [
            (name, value[0] if value and isinstance(value[0], list) else value)
            for name, value in response.items()
        ]
    else:
        items = [(name, entries) for name, entries in response]
    result: dict[str, list[tuple[str, dict[bytes, bytes]]]] = {}
    for name, entries in items:
        result[_text(name) or ""] = [
            (_text(entry_id) or "", dict(fields or {}))
            for entry_id, fields in entries or []
            if entry_id is not None
        ]
    return result


def _pairs(raw: Any) -> dict[bytes, bytes]:
    """A stream entry's fields from a script reply (a flat list) or a client reply (a dict)."""
    if isinstance(raw, dict):
        return {_bytes(k): _bytes(v) for k, v in raw.items()}
    values = list(raw or [])
    return {_bytes(values[i]): _bytes(values[i + 1]) for i in range(0, len(values) - 1, 2)}


def _field(info: Mapping[Any, Any], name: str) -> Any:
    return info.get(name, info.get(name.encode()))


def _bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="backslashreplace")
    return value if isinstance(value, str) else None


if TYPE_CHECKING:

    def _implements_port(client: redis.Redis) -> JobStreams:
        # mypy checks here that the adapter satisfies the port.
        return RedisJobStreams(client, cast("JobStreamsConfig", None))
