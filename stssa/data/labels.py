"""The AVA v2.2 action vocabulary, so that code and the synthetic dataset need no external file.

``AVA_ACTIONS`` holds the 80 classes of ``ava_action_list_v2.2.pbtxt`` as ``(label_id, name, label_type)``;
``AVA_EVAL_IDS`` the 60 ids that the official evaluation scores
(``ava_action_list_v2.2_for_activitynet_2019.pbtxt``). :func:`labelmap_pbtxt` writes either file in its
official text form; the tests check that the output equals the real files byte for byte.
"""

from __future__ import annotations

__all__ = ["AVA_ACTIONS", "AVA_EVAL_IDS", "AVA_NUM_CLASSES", "labelmap_pbtxt"]

_MOVE, _OBJECT, _INTERACT = "PERSON_MOVEMENT", "OBJECT_MANIPULATION", "PERSON_INTERACTION"

AVA_ACTIONS: tuple[tuple[int, str, str], ...] = (
    (1, "bend/bow (at the waist)", _MOVE),
    (2, "crawl", _MOVE),
    (3, "crouch/kneel", _MOVE),
    (4, "dance", _MOVE),
    (5, "fall down", _MOVE),
    (6, "get up", _MOVE),
    (7, "jump/leap", _MOVE),
    (8, "lie/sleep", _MOVE),
    (9, "martial art", _MOVE),
    (10, "run/jog", _MOVE),
    (11, "sit", _MOVE),
    (12, "stand", _MOVE),
    (13, "swim", _MOVE),
    (14, "walk", _MOVE),
    (15, "answer phone", _OBJECT),
    (16, "brush teeth", _OBJECT),
    (17, "carry/hold (an object)", _OBJECT),
    (18, "catch (an object)", _OBJECT),
    (19, "chop", _OBJECT),
    (20, "climb (e.g., a mountain)", _OBJECT),
    (21, "clink glass", _OBJECT),
    (22, "close (e.g., a door, a box)", _OBJECT),
    (23, "cook", _OBJECT),
    (24, "cut", _OBJECT),
    (25, "dig", _OBJECT),
    (26, "dress/put on clothing", _OBJECT),
    (27, "drink", _OBJECT),
    (28, "drive (e.g., a car, a truck)", _OBJECT),
    (29, "eat", _OBJECT),
    (30, "enter", _OBJECT),
    (31, "exit", _OBJECT),
    (32, "extract", _OBJECT),
    (33, "fishing", _OBJECT),
    (34, "hit (an object)", _OBJECT),
    (35, "kick (an object)", _OBJECT),
    (36, "lift/pick up", _OBJECT),
    (37, "listen (e.g., to music)", _OBJECT),
    (38, "open (e.g., a window, a car door)", _OBJECT),
    (39, "paint", _OBJECT),
    (40, "play board game", _OBJECT),
    (41, "play musical instrument", _OBJECT),
    (42, "play with pets", _OBJECT),
    (43, "point to (an object)", _OBJECT),
    (44, "press", _OBJECT),
    (45, "pull (an object)", _OBJECT),
    (46, "push (an object)", _OBJECT),
    (47, "put down", _OBJECT),
    (48, "read", _OBJECT),
    (49, "ride (e.g., a bike, a car, a horse)", _OBJECT),
    (50, "row boat", _OBJECT),
    (51, "sail boat", _OBJECT),
    (52, "shoot", _OBJECT),
    (53, "shovel", _OBJECT),
    (54, "smoke", _OBJECT),
    (55, "stir", _OBJECT),
    (56, "take a photo", _OBJECT),
    (57, "text on/look at a cellphone", _OBJECT),
    (58, "throw", _OBJECT),
    (59, "touch (an object)", _OBJECT),
    (60, "turn (e.g., a screwdriver)", _OBJECT),
    (61, "watch (e.g., TV)", _OBJECT),
    (62, "work on a computer", _OBJECT),
    (63, "write", _OBJECT),
    (64, "fight/hit (a person)", _INTERACT),
    (65, "give/serve (an object) to (a person)", _INTERACT),
    (66, "grab (a person)", _INTERACT),
    (67, "hand clap", _INTERACT),
    (68, "hand shake", _INTERACT),
    (69, "hand wave", _INTERACT),
    (70, "hug (a person)", _INTERACT),
    (71, "kick (a person)", _INTERACT),
    (72, "kiss (a person)", _INTERACT),
    (73, "lift (a person)", _INTERACT),
    (74, "listen to (a person)", _INTERACT),
    (75, "play with kids", _INTERACT),
    (76, "push (another person)", _INTERACT),
    (77, "sing to (e.g., self, a person, a group)", _INTERACT),
    (78, "take (an object) from (a person)", _INTERACT),
    (79, "talk to (e.g., self, a person, a group)", _INTERACT),
    (80, "watch (a person)", _INTERACT),
)

AVA_NUM_CLASSES = 80

# The 20 rare classes that ActivityNet 2019 / AVA v2.2 evaluation leaves out.
_NOT_EVALUATED = frozenset({2, 16, 18, 19, 21, 23, 25, 31, 32, 33, 35, 39, 40, 42, 44, 50, 53, 55, 71, 75})
AVA_EVAL_IDS: tuple[int, ...] = tuple(i for i, _, _ in AVA_ACTIONS if i not in _NOT_EVALUATED)


def labelmap_pbtxt(form: str = "label", ids=None) -> str:
    """Text of an AVA label map.

    Args:
        form: ``"label"`` for the ``label { name label_id label_type }`` form of
            ``ava_action_list_v2.2.pbtxt``, ``"item"`` for the ``item { name id }`` form of
            ``ava_action_list_v2.2_for_activitynet_2019.pbtxt``.
        ids: class ids to list (default: all 80 for ``"label"``, the 60 evaluated ones for ``"item"``).
    """
    if form not in ("label", "item"):
        raise ValueError(f"labelmap_pbtxt: form must be 'label' or 'item', got {form!r}")
    if ids is None:
        ids = [i for i, _, _ in AVA_ACTIONS] if form == "label" else list(AVA_EVAL_IDS)
    by_id = {i: (name, kind) for i, name, kind in AVA_ACTIONS}
    unknown = sorted(set(ids) - set(by_id))
    if unknown:
        raise ValueError(f"labelmap_pbtxt: ids {unknown} are not AVA v2.2 action ids (1..80)")
    parts = []
    for i in ids:
        name, kind = by_id[i]
        if form == "label":
            parts.append(f'label {{\n  name: "{name}"\n  label_id: {i}\n  label_type: {kind}\n}}\n')
        else:
            parts.append(f'item {{\n  name: "{name}"\n  id: {i}\n}}\n')
    return "".join(parts)
