"""A synthetic dataset in the exact AVA v2.2 file formats, whose actions need time to be recognised.

``python -m stssa.data.synthetic --out DIR [--videos N --seconds S --seed K --height H --width W]`` or
:func:`make_dataset`. It writes (``DIR/`` as PySlowFast's AVA data folder)::

    frames/{video_id}/{video_id}_{frame:06d}.jpg      30 fps, file number = frame index + 1 (ffmpeg %06d)
    annotations/ava_train_v2.2.csv                    video_id,timestamp,x1,y1,x2,y2,action_id,person_id
    annotations/ava_val_v2.2.csv
    annotations/ava_val_excluded_timestamps_v2.2.csv  video_id,timestamp  (keyframes left out of val)
    annotations/ava_action_list_v2.2.pbtxt            the real 80-class label map (label{} form)
    annotations/ava_action_list_v2.2_for_activitynet_2019.pbtxt   the real 60-class map (item{} form)
    annotations/ava_dense_proposals_{train,val}.pkl   {"{video_id},{ts:04d}": float32[N,5] x1,y1,x2,y2,score}
    annotations/ava_{train,val}_predicted_boxes.csv   video_id,timestamp,x1,y1,x2,y2,,score
    synthetic_info.json                               parameters, classes, splits, label counts

Each video is the AVA clip convention in miniature: frames start at second 900, keyframes are the whole
seconds ``902 .. 902 + S - 1`` at frame index ``(s - 900) * 30``, and the video runs one second past the
last keyframe plus a margin (``(S + 3) * 30`` frames). Videos are split into train and val (7:3 by default).

Each video holds 2-3 "persons": rectangles with a striped/checked texture, a head patch and a hand patch,
moving over a static textured background with mild sensor noise. A person's state changes at the
half-second between keyframes, so the window around a keyframe shows one state. Labels (real AVA ids from
the 60 evaluated classes, 1-4 per person and keyframe):

=====  ==========================  ===========================================================  ===========
id     AVA class                   what the video shows                                         cue
=====  ==========================  ===========================================================  ===========
12     stand                       no motion                                                    motion
14     walk                        horizontal translation, 0.5-0.8 % of the width per frame     motion
10     run/jog                     horizontal translation, 1.4-2.0 % of the width per frame     motion
7      jump/leap                   periodic vertical bounce (period 20 frames)                  motion
6      get up                      height grows from 0.6x to 1x over the second                 motion
1      bend/bow (at the waist)     height shrinks from 1x to 0.6x over the second               motion
69     hand wave                   hand patch oscillates up and down (period 18 frames);        motion
                                   everyone has a hand patch, still when not waving
79     talk to (a person)          next to a partner; head patch brightness changes every       motion
                                   frame (others' head patches have a constant random shade)
74     listen to (a person)        the partner of a talker (nothing in the own box)             interaction
                                                                                                (outside box)
64     fight/hit (a person)        two persons side by side oscillating towards each other     motion
                                   (period 10 frames); also labelled stand
65     give/serve (to a person)    next to a partner; holds a magenta object on the partner's   interaction
                                   side until 4 frames before the keyframe, then not            (in box, order)
78     take (from a person)        the partner of a giver: holds the magenta object from 4      interaction
                                   frames after the keyframe on                                 (in box, order)
38     open                        signal patch (lower torso) red at keyframe offsets           order
                                   [-14, -7) frames, blue at [7, 14)
22     close                       the same, blue first, red second                             order
67     hand clap                   signal patch white three times 4 frames ([-12,-8), [-2,2),   count
                                   [8,12))
34     hit (an object)             signal patch white once for 12 frames ([-6, 6))              count
15     answer phone                signal patch green for 24 frames ([-12, 12))                 duration
59     touch (an object)           signal patch green for 6 frames ([-3, 3))                    duration
17     carry/hold (an object)      holds a yellow box, or a book                                appearance
48     read                        holds a book (white sheet on the chest); also carry/hold     appearance
=====  ==========================  ===========================================================  ===========

(``ACTION_CUES`` holds the cue column.) So a single frame tells only the appearance classes (17, 48) and
that two persons stand close; speed, direction of growth, periodic motion and who is talking need several
frames. Get up and bend/bow have the same height at the keyframe and differ only in the direction of
change. Open and close show the same two colours for the same time and differ only in their order, the
two sub-events 14 frames apart (the clip spans 32); hand clap and hit have the same white on-time and
differ in the number of flashes; answer phone and touch differ in how long the flash lasts. Give and
take are the in-box interaction: each person's own box shows the object, and only the order (held then
gone, or gone then held) tells the giver from the taker; listen stays the one class whose cue lies
outside the person's box. The signal patch carries at most one of its six events per person and second.

Proposals imitate a person detector: each person is found with probability 0.97, its box jittered by
about 5 % of its size, score near 1 (``1 - |N(0, 0.1)|``); some duplicates with lower scores; about 0.8
false boxes per keyframe, scores mostly below 0.7.

Everything is drawn from ``numpy.random.default_rng`` seeded by ``(seed, video index)``: the same
arguments give the same files, byte for byte (with the same Pillow).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import string
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from stssa.data.labels import AVA_ACTIONS, AVA_EVAL_IDS, labelmap_pbtxt

__all__ = ["make_dataset", "simulate_video", "render_video", "SYNTHETIC_ACTIONS", "TEMPORAL_ACTIONS",
           "APPEARANCE_ACTIONS", "ACTION_CUES", "SIGNAL_EVENTS", "main"]

FPS = 30
VIDEO_START_SEC = 900
FIRST_KEYFRAME_SEC = 902

STAND, WALK, RUN, JUMP, GET_UP, BEND = 12, 14, 10, 7, 6, 1
HAND_WAVE, TALK, LISTEN, FIGHT, CARRY, READ = 69, 79, 74, 64, 17, 48
OPEN, CLOSE, CLAP, HIT_OBJECT, PHONE, TOUCH, GIVE, TAKE = 38, 22, 67, 34, 15, 59, 65, 78
_NAMES = {i: n for i, n, _ in AVA_ACTIONS}
#: The cue each class needs: ``appearance`` (one frame tells), ``motion`` (a local change over a few
#: frames: speed, direction, oscillation, flicker), ``order`` (which of two sub-events inside the clip comes
#: first; each alone looks the same in both classes), ``count`` (how many flashes, with the same total
#: on-time), ``duration`` (how long one flash lasts), ``interaction`` (the cue is the partner; ``in box``:
#: visible inside the person's own box, ``outside box``: only in the partner's box).
ACTION_CUES: dict[int, str] = {
    STAND: "motion", WALK: "motion", RUN: "motion", JUMP: "motion", GET_UP: "motion", BEND: "motion",
    HAND_WAVE: "motion", TALK: "motion", FIGHT: "motion", LISTEN: "interaction (outside box)",
    CARRY: "appearance", READ: "appearance", OPEN: "order", CLOSE: "order", CLAP: "count", HIT_OBJECT: "count",
    PHONE: "duration", TOUCH: "duration", GIVE: "interaction (in box, order)", TAKE: "interaction (in box, order)",
}
SYNTHETIC_ACTIONS: dict[int, str] = {i: _NAMES[i] for i in ACTION_CUES}
APPEARANCE_ACTIONS = tuple(i for i, c in ACTION_CUES.items() if c == "appearance")
TEMPORAL_ACTIONS = tuple(i for i, c in ACTION_CUES.items() if c != "appearance")
assert set(SYNTHETIC_ACTIONS) <= set(AVA_EVAL_IDS)

_LOCOMOTION = (STAND, WALK, RUN, JUMP, GET_UP, BEND)
_LOCO_P = np.array([0.24, 0.20, 0.15, 0.13, 0.14, 0.14])
_JUMP_PERIOD, _WAVE_PERIOD, _FIGHT_PERIOD = 20, 18, 10  # frames
# Signal-patch events (a patch on the lower torso), as (colour, [start, stop) frame offsets from the
# keyframe). The clip (16 frames every 2nd) covers offsets -16..14. Order: the two colours 14 frames (7
# sampled frames, beyond the ~6-frame reach of the stem + shortcuts) apart; count: 3 x 4 frames vs 1 x 12
# frames, the same on-time, so a temporal mean of the patch is the same; duration: 24 vs 6 frames.
_RED, _BLUE, _WHITE, _GREEN = (220, 30, 30), (30, 60, 230), (250, 250, 250), (40, 200, 60)
SIGNAL_EVENTS: dict[int, tuple] = {
    OPEN: ((_RED, -14, -7), (_BLUE, 7, 14)),
    CLOSE: ((_BLUE, -14, -7), (_RED, 7, 14)),
    CLAP: ((_WHITE, -12, -8), (_WHITE, -2, 2), (_WHITE, 8, 12)),
    HIT_OBJECT: ((_WHITE, -6, 6),),
    PHONE: ((_GREEN, -12, 12),),
    TOUCH: ((_GREEN, -3, 3),),
}
_SIGNALS = (0, OPEN, CLOSE, CLAP, HIT_OBJECT, PHONE, TOUCH)
_SIGNAL_P = np.array([0.46, 0.09, 0.09, 0.09, 0.09, 0.09, 0.09])
_GIFT = (250, 40, 230)  # the object handed over in give/take
_GIFT_SWITCH = 4  # the giver holds it before offset -4, the taker from offset +4
_ID_ALPHABET = string.ascii_letters + string.digits + "-_"


def _segment_of_frame(n_frames: int, seconds: int) -> np.ndarray:
    """Segment k (keyframe k at second 2 + k of the video) covers video time [k + 1.5, k + 2.5) s."""
    t = np.arange(n_frames) / FPS
    return np.clip(np.floor(t - 1.5).astype(np.int64), 0, seconds - 1)


def _markov(rng, n: int, states, p0, stay: float) -> list:
    out = [states[rng.choice(len(states), p=p0)]]
    for _ in range(n - 1):
        out.append(out[-1] if rng.random() < stay else states[rng.choice(len(states), p=p0)])
    return out


def simulate_video(rng: np.random.Generator, seconds: int, height: int, width: int) -> dict:
    """Plan and integrate one video.

    Returns a dict with ``n_frames``; ``persons``: list of dicts of per-person constants (``tex`` uint8
    texture, ``hand_side``, ``head_shade``, ...) and per-frame arrays ``x`` (centre), ``y2`` (bottom),
    ``h``, ``w``, ``hand_v`` (hand centre as a fraction of the height from the top), ``head`` (head patch
    grey level), ``obj`` (0 none, 1 box, 2 book); and ``labels[k][p]`` (sorted action ids of person ``p`` at
    keyframe ``k``) and ``boxes[k][p]`` (the body box ``(x1, y1, x2, y2)`` in pixels at that keyframe).
    """
    n_frames = (seconds + 3) * FPS
    seg = _segment_of_frame(n_frames, seconds)
    seg_start = np.searchsorted(seg, np.arange(seconds))  # first frame of each segment
    n_persons = int(rng.integers(2, 4))
    persons = []
    for _ in range(n_persons):
        h0 = rng.uniform(0.38, 0.55) * height
        p = {
            "h0": h0,
            "w0": h0 * rng.uniform(0.32, 0.45),
            "ground": rng.uniform(min(h0 * 1.3, height - 2), height - 1),
            "x0": rng.uniform(0.15, 0.85) * width,
            "walk_speed": rng.uniform(0.005, 0.008) * width,
            "run_speed": rng.uniform(0.014, 0.020) * width,
            "hand_side": int(rng.choice([-1, 1])),
            "hand_v0": rng.uniform(0.2, 0.55),
            "head_shade": rng.uniform(30, 230),
            "wave_phase": rng.uniform(0, 2 * np.pi),
            "tex": _texture(rng),
            "loco": _markov(rng, seconds, _LOCOMOTION, _LOCO_P, 0.55),
            "objs": _markov(rng, seconds, (0, 1, 2), np.array([0.55, 0.25, 0.20]), 0.7),
            "wave": _markov(rng, seconds, (False, True), np.array([0.75, 0.25]), 0.6),
            "inter": [None] * seconds,  # (kind, role, partner)
        }
        # Drawn after the constants above so the rest of a video's plan keeps its random stream.
        p["signal"] = _markov(rng, seconds, _SIGNALS, _SIGNAL_P, 0.0)
        # get up / bend last one segment: repeated ones would stack growth without a reset, so break runs.
        for k in range(1, seconds):
            if p["loco"][k] in (GET_UP, BEND) and p["loco"][k - 1] == p["loco"][k]:
                p["loco"][k] = STAND
        persons.append(p)

    # One or two interactions per video, 2-3 segments each, between two persons free at that time.
    for _ in range(int(rng.integers(1, 4)) if n_persons >= 2 and seconds >= 2 else 0):
        a, b = sorted(int(i) for i in rng.choice(n_persons, 2, replace=False))
        kind = ("talk", "fight", "give")[int(rng.choice(3, p=[0.35, 0.3, 0.35]))]
        length = int(min(rng.integers(2, 4), seconds))
        k0 = int(rng.integers(0, seconds - length + 1))
        span = range(k0, k0 + length)
        if any(persons[i]["inter"][k] is not None for i in (a, b) for k in range(max(0, k0 - 1), k0 + length)):
            continue  # keep a free segment between two interactions of one person
        talker, listener = (a, b) if rng.random() < 0.5 else (b, a)
        for k in span:
            if kind == "talk":
                persons[talker]["inter"][k] = ("talk", TALK, listener)
                persons[listener]["inter"][k] = ("talk", LISTEN, talker)
            elif kind == "give":  # talker / listener reused as giver / taker
                persons[talker]["inter"][k] = ("give", GIVE, listener)
                persons[listener]["inter"][k] = ("give", TAKE, talker)
            else:
                persons[a]["inter"][k] = ("fight", FIGHT, b)
                persons[b]["inter"][k] = ("fight", FIGHT, a)
            persons[a]["loco"][k] = persons[b]["loco"][k] = STAND

    # Integrate per frame.
    for p in persons:
        for key in ("x", "y2", "h", "w", "hand_v", "head", "obj", "gift"):
            p[key] = np.zeros(n_frames)
        p["sig"] = np.zeros((n_frames, 3))  # signal-patch colour, 0 = no patch
    pos = [[p["x0"], p["ground"], 1] for p in persons]  # x, ground y, walking direction
    for f in range(n_frames):
        k = int(seg[f])
        u = f / FPS - (k + 1.5)  # time since the segment's nominal start (segment 0 also covers t < 1.5 s)
        if f == seg_start[k]:
            for pi, p in enumerate(persons):
                if p["loco"][k] in (WALK, RUN):
                    pos[pi][2] = int(rng.choice([-1, 1]))
                inter = p["inter"][k]
                if inter is not None and inter[2] < pi and (k == 0 or p["inter"][k - 1] is None):
                    # Step next to the partner (the lower index stays) when the interaction begins: a cut,
                    # half a second before the first keyframe of the interaction.
                    qi = inter[2]
                    q = persons[qi]
                    gap = 0.5 * (p["w0"] + q["w0"]) + 0.15 * min(p["w0"], q["w0"])
                    side = 1 if pos[qi][0] + gap + p["w0"] / 2 < width - 1 else -1
                    pos[pi][0] = float(np.clip(pos[qi][0] + side * gap, p["w0"] / 2 + 1, width - 1 - p["w0"] / 2))
                    pos[pi][1] = pos[qi][1]
        for pi, p in enumerate(persons):
            loco, inter = p["loco"][k], p["inter"][k]
            h, w = p["h0"], p["w0"]
            if loco == GET_UP:
                h = p["h0"] * (0.6 + 0.4 * np.clip(u, 0, 1))
            elif loco == BEND:
                h = p["h0"] * (1.0 - 0.4 * np.clip(u, 0, 1))
            if loco in (WALK, RUN):
                speed = p["walk_speed"] if loco == WALK else p["run_speed"]
                x = pos[pi][0] + pos[pi][2] * speed
                if x - w / 2 < 1 or x + w / 2 > width - 1:  # bounce off the frame edge
                    pos[pi][2] *= -1
                    x = pos[pi][0] + pos[pi][2] * speed
                pos[pi][0] = float(np.clip(x, w / 2 + 1, width - 1 - w / 2))
            x, y2 = pos[pi][0], pos[pi][1]
            if loco == JUMP:
                y2 -= 0.18 * p["h0"] * abs(np.sin(np.pi * (f - seg_start[k]) / _JUMP_PERIOD))
            if inter is not None and inter[0] == "fight":
                toward = np.sign(pos[inter[2]][0] - pos[pi][0]) or 1.0
                x += toward * 0.12 * w * np.sin(2 * np.pi * f / _FIGHT_PERIOD) ** 2
            p["x"][f], p["y2"][f], p["h"][f], p["w"][f] = x, y2, h, w
            p["hand_v"][f] = (0.38 + 0.2 * np.sin(2 * np.pi * f / _WAVE_PERIOD + p["wave_phase"])) if p["wave"][k] \
                else p["hand_v0"]
            p["head"][f] = rng.uniform(30, 230) if inter is not None and inter[1] == TALK else p["head_shade"]
            p["obj"][f] = p["objs"][k]
            r = f - (FIRST_KEYFRAME_SEC - VIDEO_START_SEC + k) * FPS  # offset from the segment's keyframe
            for colour, r0, r1 in SIGNAL_EVENTS.get(p["signal"][k], ()):
                if r0 <= r < r1:
                    p["sig"][f] = colour
            if inter is not None and inter[0] == "give":
                # +1 / -1: the gift is shown on the side facing the partner (sign of the direction).
                toward = np.sign(pos[inter[2]][0] - pos[pi][0]) or 1.0
                holds = r < -_GIFT_SWITCH if inter[1] == GIVE else r >= _GIFT_SWITCH
                p["gift"][f] = toward if holds else 0.0

    labels, boxes = [], []
    for k in range(seconds):
        f = (FIRST_KEYFRAME_SEC - VIDEO_START_SEC + k) * FPS
        lk, bk = [], []
        for p in persons:
            inter = p["inter"][k]
            labs = {p["loco"][k]}
            if p["objs"][k] == 1:
                labs.add(CARRY)
            elif p["objs"][k] == 2:
                labs |= {CARRY, READ}
            if p["wave"][k]:
                labs.add(HAND_WAVE)
            if inter is not None:
                labs.add(inter[1])
            if p["signal"][k]:
                labs.add(p["signal"][k])
            lk.append(sorted(labs))
            bk.append(_body_box(p, f, height, width))
        labels.append(lk)
        boxes.append(bk)
    return {"n_frames": n_frames, "persons": persons, "labels": labels, "boxes": boxes}


def _body_box(p: dict, f: int, height: int, width: int) -> tuple[float, float, float, float]:
    x, y2, h, w = p["x"][f], p["y2"][f], p["h"][f], p["w"][f]
    return (max(0.0, x - w / 2), max(0.0, y2 - h), min(float(width), x + w / 2), min(float(height), y2))


def _texture(rng) -> np.ndarray:
    """A 48 x 24 two-colour pattern (stripes in one of three directions, or checks)."""
    th, tw = 48, 24
    c1 = rng.uniform(40, 200, 3)
    c2 = np.clip(c1 + rng.choice([-1, 1], 3) * rng.uniform(40, 90, 3), 0, 255)
    yy, xx = np.mgrid[0:th, 0:tw]
    period = int(rng.integers(3, 7))
    kind = int(rng.integers(0, 4))
    m = [(yy // period) % 2, (xx // period) % 2, ((xx + yy) // period) % 2,
         ((yy // period) + (xx // period)) % 2][kind]
    return np.where(m[..., None] == 1, c1, c2).astype(np.uint8)


def _background(rng, height: int, width: int) -> np.ndarray:
    coarse = rng.uniform(60, 190, (4, 5, 3))
    img = Image.fromarray(coarse.astype(np.uint8)).resize((width, height), Image.BILINEAR)
    return np.asarray(img).astype(np.float32) + rng.normal(0, 3, (height, width, 3)).astype(np.float32)


def _paste(frame: np.ndarray, y1: float, y2: float, x1: float, x2: float, value) -> None:
    h, w = frame.shape[:2]
    r1, r2 = int(round(max(0, y1))), int(round(min(h, y2)))
    c1, c2 = int(round(max(0, x1))), int(round(min(w, x2)))
    if r2 > r1 and c2 > c1:
        frame[r1:r2, c1:c2] = value


def render_video(sim: dict, rng: np.random.Generator, height: int, width: int):
    """Yield ``uint8[H, W, 3]`` frames of a simulated video."""
    bg = _background(rng, height, width)
    # Sensor noise, so that frame differences are not exactly 0 where nothing moves; drawn from a small bank
    # because a fresh Gaussian field per frame costs more than the rest of the rendering.
    noise = rng.normal(0, 1.5, (8,) + bg.shape).astype(np.float32)
    persons = sorted(sim["persons"], key=lambda p: p["ground"])  # far (higher up) first
    for f in range(sim["n_frames"]):
        frame = bg + noise[rng.integers(len(noise))]
        for p in persons:
            x, y2, h, w = p["x"][f], p["y2"][f], p["h"][f], p["w"][f]
            x1, y1, x2 = x - w / 2, y2 - h, x + w / 2
            r1, r2 = int(round(max(0, y1))), int(round(min(height, y2)))
            c1, c2 = int(round(max(0, x1))), int(round(min(width, x2)))
            if r2 <= r1 or c2 <= c1:
                continue
            tex = p["tex"]
            # Texture in body coordinates, so growth and shrinking stretch it visibly.
            rows = np.clip(((np.arange(r1, r2) + 0.5 - y1) / h * tex.shape[0]).astype(np.int64), 0, tex.shape[0] - 1)
            cols = np.clip(((np.arange(c1, c2) + 0.5 - x1) / w * tex.shape[1]).astype(np.int64), 0, tex.shape[1] - 1)
            frame[r1:r2, c1:c2] = tex[rows][:, cols]
            hs = 0.34 * w  # head patch: top centre
            _paste(frame, y1 + 0.03 * h, y1 + 0.03 * h + hs, x - hs / 2, x + hs / 2, p["head"][f])
            ps = 0.28 * w  # hand patch at one side
            hy = y1 + p["hand_v"][f] * h
            hx = x + p["hand_side"] * (w / 2 - ps / 2)
            _paste(frame, hy - ps / 2, hy + ps / 2, hx - ps / 2, hx + ps / 2, (235, 185, 150))
            if p["obj"][f] == 1:  # yellow box on the other side
                s = 0.36 * w
                ox = x - p["hand_side"] * (w / 2 - s / 2)
                _paste(frame, y1 + 0.55 * h, y1 + 0.55 * h + s, ox - s / 2, ox + s / 2, (250, 215, 0))
            elif p["obj"][f] == 2:  # book: white sheet on the chest
                _paste(frame, y1 + 0.4 * h, y1 + 0.62 * h, x - 0.3 * w, x + 0.3 * w, (245, 245, 245))
            if p["sig"][f].any():  # signal patch on the lower torso
                _paste(frame, y1 + 0.66 * h, y1 + 0.84 * h, x - 0.32 * w, x + 0.32 * w, p["sig"][f])
            if p["gift"][f]:  # the handed-over object, at the side facing the partner
                s = 0.4 * w
                gx = x + p["gift"][f] * (w / 2 - s / 2)
                _paste(frame, y1 + 0.3 * h, y1 + 0.3 * h + s, gx - s / 2, gx + s / 2, _GIFT)
        yield np.clip(frame, 0, 255).astype(np.uint8)


def _proposals(rng, gt_boxes: list[tuple], height: int, width: int) -> np.ndarray:
    """Detector-like person boxes (normalised ``[N, 5]``, score-sorted) for one keyframe."""
    out = []
    for (x1, y1, x2, y2) in gt_boxes:
        bw, bh = x2 - x1, y2 - y1
        if rng.random() < 0.97:
            jit = rng.normal(0, 0.05, 4) * [bw, bh, bw, bh]
            out.append([x1 + jit[0], y1 + jit[1], x2 + jit[2], y2 + jit[3], 1 - abs(rng.normal(0, 0.1))])
        if rng.random() < 0.15:
            jit = rng.normal(0, 0.15, 4) * [bw, bh, bw, bh]
            out.append([x1 + jit[0], y1 + jit[1], x2 + jit[2], y2 + jit[3], rng.uniform(0.2, 0.85)])
    for _ in range(rng.poisson(0.8)):
        bw, bh = rng.uniform(0.08, 0.3), rng.uniform(0.25, 0.6)
        x1, y1 = rng.uniform(0, 1 - bw), rng.uniform(0, 1 - bh)
        s = rng.uniform(0.7, 0.95) if rng.random() < 0.1 else rng.uniform(0.02, 0.7)
        out.append([x1 * width, y1 * height, (x1 + bw) * width, (y1 + bh) * height, s])
    if not out:
        return np.zeros((0, 5), np.float32)
    a = np.array(out, dtype=np.float64)
    a[:, [0, 2]] = np.clip(a[:, [0, 2]] / width, 0, 1)
    a[:, [1, 3]] = np.clip(a[:, [1, 3]] / height, 0, 1)
    a[:, 4] = np.clip(a[:, 4], 0.01, 0.999)
    a = a[(a[:, 2] > a[:, 0]) & (a[:, 3] > a[:, 1])]
    return a[np.argsort(-a[:, 4], kind="stable")].astype(np.float32)


def _video_ids(seed: int, n: int) -> list[str]:
    rng = np.random.default_rng([seed, 1 << 20])
    ids: list[str] = []
    while len(ids) < n:
        v = "".join(rng.choice(list(_ID_ALPHABET), 11))
        if v not in ids:
            ids.append(v)
    return ids


def make_dataset(out_dir, videos: int = 20, seconds: int = 10, seed: int = 0, height: int = 96, width: int = 128,
                 val_fraction: float = 0.3, jpeg_quality: int = 90, overwrite: bool = False,
                 verbose: bool = False, videos_format: str | None = None) -> dict[str, str]:
    """Write the synthetic dataset (layout and content in the module docstring).

    Args:
        out_dir: output folder (created).
        videos: number of videos (>= 2: at least one train and one val video).
        seconds: keyframes per video.
        seed: everything is a function of the arguments.
        height, width: frame size in pixels.
        val_fraction: share of videos in val (rounded, at least 1).
        jpeg_quality: Pillow JPEG quality.
        overwrite: replace an existing ``frames/`` folder under ``out_dir`` (else refuse, so that stale frames
            of another configuration cannot be read as part of these videos).
        videos_format: ``"mp4"`` also writes each video as ``videos/{video_id}.mp4`` (H.264, the same frames at
            30 fps, presented from second 900 as the frames are numbered, so ``python -m stssa.data.frames``
            with its AVA defaults gives the frame folders back; :mod:`stssa.data.video`).

    Returns:
        ``{"root", "frames", "train_csv", "val_csv", "excluded_csv", "labelmap" (80 classes),
        "labelmap_eval" (60 classes), "train_proposals_pkl", "val_proposals_pkl", "train_proposals_csv",
        "val_proposals_csv", "info"}`` as ``str`` paths. The defaults (20 videos x 10 keyframes, 96 x 128)
        give 7800 JPEGs (about 27 MB), 140 train and 54 val keyframes
        (6 more val keyframes excluded) with 2-3 persons each; writing them takes about 20 s on 2 cores.
    """
    if videos < 2:
        raise ValueError(f"make_dataset: videos must be >= 2 (train and val), got {videos}")
    if seconds < 1:
        raise ValueError(f"make_dataset: seconds must be >= 1, got {seconds}")
    if height < 16 or width < 16:
        raise ValueError(f"make_dataset: frames must be at least 16x16, got {height}x{width}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"make_dataset: val_fraction must lie in (0, 1), got {val_fraction}")
    if videos_format not in (None, "mp4"):
        raise ValueError(f"make_dataset: videos_format must be None or 'mp4', got {videos_format!r}")
    if videos_format and (height % 2 or width % 2):
        raise ValueError(f"make_dataset: MP4 videos need an even height and width, got {height}x{width}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"make_dataset: {out} exists and is not a folder")
    frames_dir, ann = out / "frames", out / "annotations"
    replacing = frames_dir.exists() and any(frames_dir.iterdir())
    if replacing and not overwrite:
        raise FileExistsError(f"make_dataset: {frames_dir} is not empty; pass overwrite=True (--overwrite) "
                              "to replace it")
    # the info file goes first and comes back last (atomically): an interrupted run leaves a folder
    # without one, which nothing mistakes for a complete set
    (out / "synthetic_info.json").unlink(missing_ok=True)
    shutil.rmtree(frames_dir, ignore_errors=True)
    if replacing or videos_format:  # the old set's MP4s go with its frames (stale ones would stay otherwise)
        shutil.rmtree(out / "videos", ignore_errors=True)
    frames_dir.mkdir(parents=True, exist_ok=True)
    ann.mkdir(parents=True, exist_ok=True)
    if videos_format:
        (out / "videos").mkdir()
    paths = {
        "root": out, "frames": frames_dir,
        "train_csv": ann / "ava_train_v2.2.csv", "val_csv": ann / "ava_val_v2.2.csv",
        "excluded_csv": ann / "ava_val_excluded_timestamps_v2.2.csv",
        "labelmap": ann / "ava_action_list_v2.2.pbtxt",
        "labelmap_eval": ann / "ava_action_list_v2.2_for_activitynet_2019.pbtxt",
        "train_proposals_pkl": ann / "ava_dense_proposals_train.pkl",
        "val_proposals_pkl": ann / "ava_dense_proposals_val.pkl",
        "train_proposals_csv": ann / "ava_train_predicted_boxes.csv",
        "val_proposals_csv": ann / "ava_val_predicted_boxes.csv",
        "info": out / "synthetic_info.json",
    }
    if videos_format:
        paths["videos"] = out / "videos"
    n_val = min(videos - 1, max(1, int(round(videos * val_fraction))))  # at least one video each
    ids = _video_ids(seed, videos)
    split_of = {v: ("val" if i >= videos - n_val else "train") for i, v in enumerate(ids)}
    rows = {"train": [], "val": []}
    props = {"train": {}, "val": {}}
    label_counts = {"train": {}, "val": {}}
    t0 = time.time()
    for vi, vid in enumerate(ids):
        rng = np.random.default_rng([seed, vi])
        sim = simulate_video(rng, seconds, height, width)
        vdir = frames_dir / vid
        vdir.mkdir()
        writer = None
        if videos_format:
            from stssa.data.video import VideoWriter
            writer = VideoWriter(out / "videos" / f"{vid}.{videos_format}", FPS, start_time=VIDEO_START_SEC)
        for f, frame in enumerate(render_video(sim, rng, height, width)):
            Image.fromarray(frame).save(vdir / f"{vid}_{f + 1:06d}.jpg", format="JPEG", quality=jpeg_quality)
            if writer is not None:
                writer.write(frame)
        if writer is not None:
            writer.close()
        split = split_of[vid]
        for k in range(seconds):
            ts = FIRST_KEYFRAME_SEC + k
            for pid, (box, labs) in enumerate(zip(sim["boxes"][k], sim["labels"][k])):
                nb = (box[0] / width, box[1] / height, box[2] / width, box[3] / height)
                for a in labs:
                    rows[split].append(f"{vid},{ts:04d},{nb[0]:.3f},{nb[1]:.3f},{nb[2]:.3f},{nb[3]:.3f},{a},{pid}")
                    label_counts[split][a] = label_counts[split].get(a, 0) + 1
            props[split][f"{vid},{ts:04d}"] = _proposals(rng, sim["boxes"][k], height, width)
        if verbose:
            print(f"  video {vi + 1}/{videos} {vid} ({split}): {sim['n_frames']} frames, "
                  f"{len(sim['persons'])} persons [{time.time() - t0:.1f}s]", flush=True)

    # Exclude ~10 % of val keyframes (at least one when there are 5 or more): out of the val CSV, listed
    # in the exclusions file, still present in the proposals, as in the real release.
    val_keys = sorted({tuple(r.split(",")[:2]) for r in rows["val"]})
    rng = np.random.default_rng([seed, 1 << 21])
    n_ex = int(round(0.1 * len(val_keys))) if len(val_keys) >= 5 else 0
    excluded = {val_keys[i] for i in rng.choice(len(val_keys), n_ex, replace=False)} if n_ex else set()
    rows["val"] = [r for r in rows["val"] if tuple(r.split(",")[:2]) not in excluded]
    for a in list(label_counts["val"]):
        label_counts["val"][a] = sum(1 for r in rows["val"] if int(r.split(",")[6]) == a)

    def write(path, lines):
        Path(path).write_text("".join(line + "\n" for line in lines))

    write(paths["train_csv"], rows["train"])
    write(paths["val_csv"], rows["val"])
    write(paths["excluded_csv"], [f"{v},{t}" for v, t in sorted(excluded)])
    Path(paths["labelmap"]).write_text(labelmap_pbtxt("label"))
    Path(paths["labelmap_eval"]).write_text(labelmap_pbtxt("item"))
    for split in ("train", "val"):
        with open(paths[f"{split}_proposals_pkl"], "wb") as f:
            pickle.dump(props[split], f, protocol=4)
        write(paths[f"{split}_proposals_csv"],
              [f"{key},{b[0]:.3f},{b[1]:.3f},{b[2]:.3f},{b[3]:.3f},,{b[4]:.6f}"
               for key, arr in props[split].items() for b in arr.tolist()])
    info = {
        "generator": "stssa.data.synthetic",
        "args": {"videos": videos, "seconds": seconds, "seed": seed, "height": height, "width": width,
                 "val_fraction": val_fraction, "jpeg_quality": jpeg_quality},
        "fps": FPS, "video_start_sec": VIDEO_START_SEC, "frames_per_video": (seconds + 3) * FPS,
        "frame_pattern": "{video_id}/{video_id}_{frame:06d}.jpg", "frame_start": 1,
        "keyframes": [FIRST_KEYFRAME_SEC, FIRST_KEYFRAME_SEC + seconds - 1],
        "classes": {str(i): {"name": n, "cue": ACTION_CUES[i]} for i, n in SYNTHETIC_ACTIONS.items()},
        "videos": {s: [v for v in ids if split_of[v] == s] for s in ("train", "val")},
        "excluded": [f"{v},{t}" for v, t in sorted(excluded)],
        "label_rows": {s: {str(k): v for k, v in sorted(c.items())} for s, c in label_counts.items()},
    }
    tmp = Path(str(paths["info"]) + ".tmp")
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, paths["info"])
    return {k: str(v) for k, v in paths.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m stssa.data.synthetic",
                                description="Write a synthetic dataset in the AVA v2.2 formats.")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--videos", type=int, default=20)
    p.add_argument("--seconds", type=int, default=10, help="keyframes per video")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--height", type=int, default=96)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--overwrite", action="store_true", help="replace an existing frames/ folder")
    p.add_argument("--videos-format", choices=["mp4"], default=None,
                   help="also write each video as videos/{video_id}.mp4")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    if a.videos < 2 or a.seconds < 1 or a.height < 16 or a.width < 16:
        p.error("need --videos >= 2 (train and val), --seconds >= 1, --height and --width >= 16")
    if a.videos_format and (a.height % 2 or a.width % 2):
        p.error(f"--videos-format mp4 needs an even --height and --width, got {a.height}x{a.width}")
    t0 = time.time()
    try:
        paths = make_dataset(a.out, videos=a.videos, seconds=a.seconds, seed=a.seed, height=a.height,
                             width=a.width, overwrite=a.overwrite, verbose=not a.quiet, videos_format=a.videos_format)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    info = json.loads(Path(paths["info"]).read_text())
    print(f"wrote {a.videos} videos x {a.seconds} keyframes ({info['frames_per_video']} frames each, "
          f"{a.height}x{a.width}) to {a.out} in {time.time() - t0:.1f}s")
    for k, v in paths.items():
        print(f"  {k:<20} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
