"""The Responses API's memory: recent responses by id, each with the conversation that led to it, so
`previous_response_id` can continue it (the prefix cache makes the resent turns cheap) and
`GET /v1/responses/{id}` can return it. Bounded in count and in bytes (a conversation may be as
long as the context): the oldest go first; nothing reaches disk."""

from __future__ import annotations

import copy
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any


@dataclass
class StoredResponse:
    response: dict[str, Any]  # the response object as it was sent
    conversation: list[dict[str, Any]]  # chat messages: earlier turns, this input, this reply
    size: int = 0  # bytes, roughly (its JSON)


class ResponseStore:
    def __init__(self, max_responses: int = 512, max_bytes: int = 64 << 20) -> None:
        self._items: OrderedDict[str, StoredResponse] = OrderedDict()
        self._max = max_responses
        self._max_bytes = max_bytes
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, response_id: str, response: dict[str, Any], conversation: list[dict[str, Any]]) -> None:
        size = len(json.dumps(response)) + len(json.dumps(conversation))
        item = StoredResponse(copy.deepcopy(response), copy.deepcopy(conversation), size)
        with self._lock:
            old = self._items.pop(response_id, None)
            if old is not None:
                self._bytes -= old.size
            self._items[response_id] = item
            self._bytes += size
            while self._items and (len(self._items) > self._max or self._bytes > self._max_bytes):
                _, gone = self._items.popitem(last=False)
                self._bytes -= gone.size

    def get(self, response_id: str) -> StoredResponse | None:
        with self._lock:
            item = self._items.get(response_id)
            return None if item is None else copy.deepcopy(item)

    def delete(self, response_id: str) -> bool:
        with self._lock:
            gone = self._items.pop(response_id, None)
            if gone is not None:
                self._bytes -= gone.size
            return gone is not None

    def __len__(self) -> int:
        return len(self._items)
