"""Home Assistant MQTT discovery for the ``mqtt`` sink: what to announce, zone occupancy from
events, and the record of what was announced.

Home Assistant creates an entity for every retained JSON document under
``<discovery_prefix>/<component>/<node_id>/<object_id>/config`` and removes it when that topic's
retained payload is emptied. The sink announces, per source (one Home Assistant device per
source):

- a ``sensor`` per configured label: how many objects of that label the newest detection
  message has (a ``value_template`` over the detections topic, so nothing extra is published);
- with zones, a ``binary_sensor`` (device class ``occupancy``) per zone, whose state the sink
  publishes retained on ``<prefix>/<pipeline>/<source>/zones/<zone>/occupancy`` (``ON``/``OFF``).

Removing a label, a zone, a source or the whole ``homeassistant`` section removes the entities:
the sink keeps the topics it announced in ``homeassistant.json`` in its state directory and, on
each connection, empties the retained payload of every announced topic the config no longer
wants, and only then records the new set.

Occupancy comes from the event messages (``Frame.events``) of the tracking stages: an event
names its ``track_id``, the ``zones`` the track is in now, and its lifecycle in ``type`` (``end``
when the track is gone). A zone is occupied while some live track's latest event lists it.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Dict, Iterable, List, Optional, Set, Tuple

from edgepipe import __version__

__all__ = ["Announcements", "ZoneOccupancy", "discovery", "stale", "zone_state_topic"]

_SLUG = re.compile(r"[^a-z0-9]+")


def _slug(text: str) -> str:
    return _SLUG.sub("_", text.lower()).strip("_") or "x"


def zone_state_topic(prefix: str, pipeline: str, source: str, zone: str) -> str:
    return f"{prefix}/{pipeline}/{source}/zones/{_slug(zone)}/occupancy"


def discovery(
    discovery_prefix: str,
    prefix: str,
    pipeline: str,
    sources: Iterable[str],
    labels: Iterable[str],
    zones: Iterable[str],
    availability_topic: Optional[str],
) -> Dict[str, bytes]:
    """Discovery topic -> retained config payload for every entity the config wants."""
    out: Dict[str, bytes] = {}
    node = f"edgepipe_{pipeline}"
    labels, zones = list(labels), list(zones)
    for source in sorted(set(sources)):
        device = {
            "identifiers": [f"edgepipe_{pipeline}_{source}"],
            "name": f"{source} ({pipeline})",
            "manufacturer": "edgepipe",
            "model": "edgepipe pipeline",
            "sw_version": __version__,
        }
        common: Dict[str, Any] = {"device": device}
        if availability_topic:
            common.update(
                availability_topic=availability_topic, payload_available="online", payload_not_available="offline"
            )
        for label in labels:
            object_id = f"{source}_{_slug(label)}_count"
            # Jinja reads a JSON string literal as a string; the label may hold any character.
            template = (
                "{{ value_json.detections | selectattr('label', 'equalto', "
                + json.dumps(label)
                + ") | list | length }}"
            )
            config = dict(
                common,
                name=f"{label} count",
                unique_id=f"{node}_{object_id}",
                state_topic=f"{prefix}/{pipeline}/{source}/detections",
                value_template=template,
                state_class="measurement",
                icon="mdi:counter",
            )
            out[f"{discovery_prefix}/sensor/{node}/{object_id}/config"] = json.dumps(config, sort_keys=True).encode()
        for zone in zones:
            object_id = f"{source}_{_slug(zone)}_occupancy"
            config = dict(
                common,
                name=f"{zone} occupancy",
                unique_id=f"{node}_{object_id}",
                state_topic=zone_state_topic(prefix, pipeline, source, zone),
                device_class="occupancy",
                payload_on="ON",
                payload_off="OFF",
            )
            out[f"{discovery_prefix}/binary_sensor/{node}/{object_id}/config"] = json.dumps(config, sort_keys=True).encode()
    return out


class ZoneOccupancy:
    """Which configured zones hold a live track, per source, from the event messages."""

    def __init__(self, zones: Iterable[str]) -> None:
        self.zones = list(zones)
        self._tracks: Dict[Tuple[str, Any], Set[str]] = {}  # (source, track id) -> zones it is in

    def update(self, source: str, event: Dict[str, Any]) -> None:
        track = event.get("track_id")
        if track is None or isinstance(track, (dict, list)):
            return
        key = (source, track)
        if event.get("type") == "end":
            self._tracks.pop(key, None)
            return
        zones = event.get("zones")
        if isinstance(zones, list):
            self._tracks[key] = {z for z in zones if isinstance(z, str)}

    def state(self, source: str) -> Dict[str, str]:
        """Zone -> "ON"/"OFF" for ``source``."""
        inside: Set[str] = set()
        for (s, _), zones in self._tracks.items():
            if s == source:
                inside |= zones
        return {z: "ON" if z in inside else "OFF" for z in self.zones}

    def forget(self, source: str) -> None:
        for key in [k for k in self._tracks if k[0] == source]:
            del self._tracks[key]


class Announcements:
    """What the sink announced to Home Assistant (retained topics it owns) and the sources it
    saw, kept in a small JSON file that is replaced atomically."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.topics: Set[str] = set()
        self.sources: Set[str] = set()
        try:
            with open(path, "rb") as f:
                data = json.loads(f.read())
            self.topics = {t for t in data.get("topics", []) if isinstance(t, str)}
            self.sources = {s for s in data.get("sources", []) if isinstance(s, str)}
        except (OSError, ValueError, AttributeError):
            pass  # nothing announced yet (or an unreadable file: nothing to remove then)

    def save(self, topics: Iterable[str], sources: Iterable[str]) -> None:
        self.topics, self.sources = set(topics), set(sources)
        if not self.topics:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            return
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"topics": sorted(self.topics), "sources": sorted(self.sources)}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


def stale(announced: Iterable[str], wanted: Iterable[str]) -> List[str]:
    """Announced topics the config no longer wants."""
    return sorted(set(announced) - set(wanted))

