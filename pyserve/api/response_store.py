"""The Responses API's memory: recent responses by id, each with the conversation that led to it, so
`previous_response_id` can continue it (the prefix cache makes the resent turns cheap) and
`GET /v1/responses/{id}` can return it. Bounded: the oldest go first; nothing reaches disk."""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any


@dataclass
class StoredResponse:
    response: dict[str, Any]  # the response object as it was sent
    conversation: list[dict[str, Any]]  # chat messages: earlier turns, this input, this reply


class ResponseStore:
    def __init__(self, max_responses: int = 512) -> None:
        self._items: OrderedDict[str, StoredResponse] = OrderedDict()
        self._max = max_responses
        self._lock = threading.Lock()

    def put(self, response_id: str, response: dict[str, Any], conversation: list[dict[str, Any]]) -> None:
        with self._lock:
            self._items[response_id] = StoredResponse(copy.deepcopy(response), copy.deepcopy(conversation))
            self._items.move_to_end(response_id)
            while len(self._items) > self._max:
                self._items.popitem(last=False)

    def get(self, response_id: str) -> StoredResponse | None:
        with self._lock:
            item = self._items.get(response_id)
            return None if item is None else copy.deepcopy(item)

    def delete(self, response_id: str) -> bool:
        with self._lock:
            return self._items.pop(response_id, None) is not None

    def __len__(self) -> int:
        return len(self._items)
