"""TMRoPE: the 3D (time, height, width) position ids of the Qwen-Omni Thinkers. Pure functions.

Rules (Qwen2.5-Omni paper, and the reference's ``get_rope_index``):

* text: the three components are equal and increase by one per token;
* image: time is constant, height/width are the token's row/column in the merged grid;
* video: time = frame-group index × seconds-per-grid × ``position_id_per_seconds`` (25/s, truncated);
* audio: one position per audio token (40 ms), all three components equal;
* every modality starts right after the largest position used so far;
* ``use_audio_in_video``: the video's tokens and its audio track's tokens are cut into 2-second
  chunks by their time position and interleaved (video chunk, then audio chunk).

Worked example (one 2×4 patch image → 1×2 merged tokens, text around it)::

    tokens   : T  T  <vision_bos> I  I  <vision_eos> T
    time     : 0  1  2            3  3  4            5
    height   : 0  1  2            3  3  4            5
    width    : 0  1  2            3  4  4            5
    rope delta = (max position + 1) - number of tokens = 6 - 7 = -1

While decoding, each new token's position is the previous token's position + 1 in every component.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenIds:
    """The special token ids that positions depend on (from the Thinker config)."""

    image: int
    video: int
    audio: int
    vision_start: int
    audio_start: int


def audio_token_count(feature_len: int) -> int:
    """Audio tokens of a Qwen2.5-Omni clip of ``feature_len`` mel frames (conv stride 2, then ×2 pooling).

    >>> audio_token_count(100)  # 1 s of audio
    25
    """
    after_conv = (feature_len - 1) // 2 + 1
    return (after_conv - 2) // 2 + 1


def vision_positions(start: int, t_index: torch.Tensor, grid_h: int, grid_w: int, merge: int) -> torch.Tensor:
    """[3, t*h*w] positions of one image/video: (t_index, row, column) of the merged grid, + start."""
    h, w = grid_h // merge, grid_w // merge
    t = t_index.view(-1, 1).expand(-1, h * w).flatten()
    rows = torch.arange(h).view(1, -1, 1).expand(len(t_index), -1, w).flatten()
    cols = torch.arange(w).view(1, 1, -1).expand(len(t_index), h, -1).flatten()
    return torch.stack([t, rows, cols]) + start


def video_time_index(grid_t: int, second_per_grid: float, per_second: int) -> torch.Tensor:
    """Time positions of a video's frame groups; float32 arithmetic then truncation, as the reference."""
    spg = torch.tensor(second_per_grid, dtype=torch.float32)
    return (torch.arange(grid_t) * spg * per_second).long()


def chunk_bounds(time_positions: torch.Tensor, per_chunk: int, start: int) -> list[tuple[int, int]]:
    """Split increasing time positions into runs by which ``per_chunk``-wide window (after ``start``) they fall in.

    >>> chunk_bounds(torch.tensor([0, 0, 25, 50, 75, 100]), 50, 0)
    [(0, 3), (3, 5), (5, 6)]
    """
    bounds, begin, chunk = [], 0, 1
    for i, t in enumerate(time_positions.tolist()):
        if t - start >= chunk * per_chunk:
            bounds.append((begin, i))
            begin = i
            chunk += 1
    bounds.append((begin, len(time_positions)))
    return bounds


def _text(n: int, start: int) -> torch.Tensor:
    return torch.arange(n).view(1, -1).expand(3, -1) + start


def _row_positions(
    tokens: list[int],
    ids: TokenIds,
    image_grids: list[list[int]],
    video_grids: list[list[int]],
    audio_lens: list[int],
    second_per_grid: list[float],
    counters: dict[str, int],
    use_audio_in_video: bool,
    merge: int,
    per_second: int,
    seconds_per_chunk: int,
) -> torch.Tensor:
    parts: list[torch.Tensor] = []

    def next_start() -> int:
        return int(parts[-1].max()) + 1 if parts else 0

    n = len(tokens)
    starts = [i for i, tok in enumerate(tokens) if tok == ids.vision_start]
    after_vstart = [tokens[i + 1] for i in starts if i + 1 < n]
    n_audio = sum(1 for tok in tokens if tok == ids.audio_start)
    n_image = sum(1 for tok in after_vstart if tok == ids.image)
    n_video = sum(1 for tok in after_vstart if tok == (ids.audio_start if use_audio_in_video else ids.video))
    remain = {"image": n_image, "video": n_video, "audio": n_audio}
    total = n_image + n_audio if use_audio_in_video else n_image + n_video + n_audio

    def find(tok: int, key: str, st: int) -> int:
        if remain[key] > 0:
            try:
                return tokens.index(tok, st)
            except ValueError:
                pass
        return n + 1

    st = 0
    for _ in range(total):
        ed = {"image": find(ids.image, "image", st), "video": find(ids.video, "video", st), "audio": find(ids.audio, "audio", st)}
        first = min(ed.values())
        if first == ed["audio"]:
            kind = "audio"
        elif first == ed["image"]:
            kind = "image"
        else:
            kind = "video"
        in_video_audio = kind == "video" and use_audio_in_video
        text_len = first - st - (2 if in_video_audio else 1)
        if text_len:
            parts.append(_text(text_len, next_start()))
        bos = next_start()
        parts.append(_text(1, bos))
        if in_video_audio:
            parts.append(_text(1, bos))  # <|vision_bos|> and <|audio_bos|> share one position

        start = next_start()
        if kind == "audio":
            length = audio_token_count(audio_lens[counters["audio"]])
            parts.append(_text(length, start))
            counters["audio"] += 1
            remain["audio"] -= 1
            used = length
        elif kind == "image":
            t, h, w = image_grids[counters["image"]]
            parts.append(vision_positions(start, torch.arange(t) * per_second, h, w, merge))
            counters["image"] += 1
            remain["image"] -= 1
            used = t * h * w // merge**2
        else:
            t, h, w = video_grids[counters["video"]]
            time_index = video_time_index(t, second_per_grid[counters["video"]], per_second)
            video = vision_positions(start, time_index, h, w, merge)
            used = t * h * w // merge**2
            if in_video_audio:
                a_len = audio_token_count(audio_lens[counters["audio"]])
                audio = _text(a_len, start)
                per_chunk = int(per_second * seconds_per_chunk)
                v_chunks = chunk_bounds(video[0], per_chunk, start)
                a_chunks = chunk_bounds(audio[0], per_chunk, start)
                for j in range(max(len(v_chunks), len(a_chunks))):
                    if j < len(v_chunks):
                        parts.append(video[:, v_chunks[j][0] : v_chunks[j][1]])
                    if j < len(a_chunks):
                        parts.append(audio[:, a_chunks[j][0] : a_chunks[j][1]])
                used += a_len
                counters["audio"] += 1
                remain["audio"] -= 1
            else:
                parts.append(video)
            counters["video"] += 1
            remain["video"] -= 1
        eos = next_start()
        parts.append(_text(1, eos))
        if in_video_audio:
            parts.append(_text(1, eos))
        st += text_len + used + (4 if in_video_audio else 2)

    if st < n:
        parts.append(_text(n - st, next_start()))
    return torch.cat(parts, dim=1) if parts else torch.zeros(3, 0, dtype=torch.long)


def rope_index(
    input_ids: torch.Tensor,
    ids: TokenIds,
    attention_mask: torch.Tensor | None = None,
    image_grid_thw: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
    audio_feature_lengths: torch.Tensor | None = None,
    video_second_per_grid: torch.Tensor | None = None,
    use_audio_in_video: bool = False,
    spatial_merge_size: int = 2,
    position_id_per_seconds: int = 25,
    seconds_per_chunk: int = 2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2.5-Omni TMRoPE position ids ``[3, B, T]`` and rope deltas ``[B, 1]`` for a (left-padded) batch.

    Padding positions get position 1 (as the reference); the delta of a row is
    ``max position + 1 - number of real tokens``: the offset between text positions and the
    token count that decoding continues from. Images/videos/audios are numbered across the batch
    in order, as the processor emits them.
    """
    batch, seq = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    mask = attention_mask.bool()
    position_ids = torch.ones(3, batch, seq, dtype=torch.long)
    deltas = []
    image_grids = image_grid_thw.tolist() if image_grid_thw is not None else []
    video_grids = video_grid_thw.tolist() if video_grid_thw is not None else []
    audio_lens = audio_feature_lengths.tolist() if audio_feature_lengths is not None else []
    spg = video_second_per_grid.float().tolist() if video_second_per_grid is not None else [1.0] * len(video_grids)
    counters = {"image": 0, "video": 0, "audio": 0}
    for b in range(batch):
        tokens = input_ids[b][mask[b].cpu()].tolist()
        if audio_feature_lengths is None and ids.audio in tokens:
            # Without lengths the audio placeholders are numbered like text (one position each).
            pos = _text(len(tokens), 0) if not (image_grids or video_grids) else None
            if pos is None:
                raise ValueError("audio_feature_lengths (or feature_attention_mask) is required with audio + vision")
        else:
            pos = _row_positions(
                tokens, ids, image_grids, video_grids, audio_lens, spg, counters, use_audio_in_video,
                spatial_merge_size, position_id_per_seconds, seconds_per_chunk,
            )
        if pos.shape[1] != len(tokens):
            raise ValueError(
                f"row {b}: placeholder tokens do not match the media (positions for {pos.shape[1]} tokens, "
                f"{len(tokens)} tokens given); was the input built by the matching processor?"
            )
        position_ids[:, b, mask[b].cpu()] = pos
        deltas.append(int(pos.max()) + 1 - len(tokens) if len(tokens) else 0)
    device = input_ids.device
    return position_ids.to(device), torch.tensor(deltas, dtype=torch.long, device=device).unsqueeze(1)


# --- Qwen3-Omni ------------------------------------------------------------------------------------
#
# Same idea as above, with the reference's (transformers 5.23 ``Qwen3OmniMoe...get_rope_index``)
# differences, all matched here:
#
# * positions are float32: video time = frame-group index × seconds-per-grid × ``position_id_per_seconds``
#   is *not* truncated (0.5 s grids at 13 positions/s give times 0, 6.5, 13, ...), and later tokens
#   continue from there;
# * audio token counts come from the AuT (chunks of ``2 * n_window`` mel frames, ×8 downsampling);
# * ``use_audio_in_video``: <|vision_start|><|audio_start|> take two consecutive positions (not one
#   shared), and the video and audio tokens are merged one token at a time by time position (video
#   first on ties) instead of in 2-second chunks;
# * without any image/video grid the positions are plain text positions (audio tokens are numbered
#   like text anyway), and padding gets position 1; with a grid, padding gets 0;
# * each next run starts after the largest position of the *last* run appended (one token, or the
#   rest of the longer track, for interleaved video/audio), not of everything before.


def aut_token_count(feature_len: int, n_window: int = 50) -> int:
    """Audio tokens of a Qwen3-Omni clip of ``feature_len`` mel frames (AuT: 3 stride-2 convs per chunk).

    The clip is cut into chunks of ``2 * n_window`` frames; a full chunk gives 13 tokens (100 frames at
    ``n_window=50``: 100 → 50 → 25 → 13), the shorter last chunk ``ceil(ceil(ceil(r/2)/2)/2)``.

    >>> aut_token_count(100), aut_token_count(250), aut_token_count(7)
    (13, 33, 1)
    """
    chunk = 2 * n_window
    full, rest = divmod(int(feature_len), chunk)
    per_full = chunk
    for _ in range(3):
        per_full = (per_full - 1) // 2 + 1
        rest = (rest - 1) // 2 + 1 if rest > 0 else 0
    return full * per_full + rest


def _merge_by_time(video: torch.Tensor, audio: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Interleave video [3, Nv] and audio [3, Na] positions by time (video first on ties).

    Returns the merged positions and the largest position of the reference's last appended run (the
    remainder of the longer track, or the single last token when both end together).
    """
    vt, at = video[0].tolist(), audio[0].tolist()
    order, i, j = [], 0, 0
    while i < len(vt) and j < len(at):
        if vt[i] <= at[j]:
            order.append(("v", i))
            i += 1
        else:
            order.append(("a", j))
            j += 1
    cols = [video[:, k] if src == "v" else audio[:, k] for src, k in order]
    merged = torch.stack(cols, dim=1) if cols else video[:, :0]
    if i < len(vt):
        rest = video[:, i:]
    elif j < len(at):
        rest = audio[:, j:]
    else:
        rest = merged[:, -1:]
    return torch.cat([merged, video[:, i:], audio[:, j:]], dim=1), float(rest.max())


def _qwen3_row_positions(
    tokens: list[int],
    ids: TokenIds,
    image_grids: list[list[int]],
    video_grids: list[list[int]],
    audio_lens: list[int],
    second_per_grid: list[float],
    counters: dict[str, int],
    use_audio_in_video: bool,
    merge: int,
    per_second: float,
    n_window: int,
) -> torch.Tensor:
    parts: list[torch.Tensor] = []
    last_max: list[float] = []  # largest position of each appended run (the next run starts after it)

    def add(p: torch.Tensor, top: float | None = None) -> None:
        parts.append(p.float())
        last_max.append(float(p.max()) if top is None else top)

    def next_start() -> float:
        return last_max[-1] + 1 if last_max else 0.0

    def text(n: int, start: float) -> torch.Tensor:
        return torch.arange(n, dtype=torch.float32).view(1, -1).expand(3, -1) + start

    def vision(start: float, t_index: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
        h, w = grid_h // merge, grid_w // merge
        t = t_index.view(-1, 1).expand(-1, h * w).flatten()
        rows = torch.arange(h).view(1, -1, 1).expand(len(t_index), -1, w).flatten().float()
        cols = torch.arange(w).view(1, 1, -1).expand(len(t_index), h, -1).flatten().float()
        return torch.stack([t, rows, cols]) + start

    n = len(tokens)
    starts = [i for i, tok in enumerate(tokens) if tok == ids.vision_start]
    after_vstart = [tokens[i + 1] for i in starts if i + 1 < n]
    n_audio = sum(1 for tok in tokens if tok == ids.audio_start)
    n_image = sum(1 for tok in after_vstart if tok == ids.image)
    n_video = sum(1 for tok in after_vstart if tok == (ids.audio_start if use_audio_in_video else ids.video))
    remain = {"image": n_image, "video": n_video, "audio": n_audio}
    total = n_image + n_audio if use_audio_in_video else n_image + n_video + n_audio
    has_vision_tokens = ids.image in tokens or ids.video in tokens
    has_audio_tokens = ids.audio in tokens

    st = 0
    for _ in range(total):
        start = next_start()
        ed_vision = n + 1
        if has_vision_tokens and (remain["video"] > 0 or remain["image"] > 0):
            ed_vision = tokens.index(ids.vision_start, st)
        ed_audio = n + 1
        if has_audio_tokens and remain["audio"] > 0:
            ed_audio = tokens.index(ids.audio_start, st)
        first = min(ed_vision, ed_audio)
        text_len = first - st
        if text_len:
            add(text(text_len, start))
            start += text_len
        in_video_audio = first == ed_vision and ed_vision + 1 == ed_audio
        edge = 2 if in_video_audio else 1
        add(text(edge, start))
        start += edge
        if first == ed_audio:
            length = aut_token_count(audio_lens[counters["audio"]], n_window)
            add(text(length, start))
            counters["audio"] += 1
            remain["audio"] -= 1
            used = length
        elif tokens[first + 1] == ids.image:
            t, h, w = image_grids[counters["image"]]
            add(vision(start, torch.arange(t).float() * per_second, h, w))
            counters["image"] += 1
            remain["image"] -= 1
            used = t * h * w // merge**2
        else:
            t, h, w = video_grids[counters["video"]]
            spg = torch.tensor(second_per_grid[counters["video"]], dtype=torch.float32)
            video = vision(start, torch.arange(t).float() * spg * per_second, h, w)
            used = t * h * w // merge**2
            if tokens[first + 1] == ids.video:
                add(video)
            else:  # audio track interleaved with the video
                a_len = aut_token_count(audio_lens[counters["audio"]], n_window)
                merged, top = _merge_by_time(video, text(a_len, start))
                add(merged, top)
                used += a_len
                counters["audio"] += 1
                remain["audio"] -= 1
            counters["video"] += 1
            remain["video"] -= 1
        add(text(edge, next_start()))
        st += text_len + edge + used + edge

    if st < n:
        add(text(n - st, next_start()))
    return torch.cat(parts, dim=1) if parts else torch.zeros(3, 0)


def qwen3_rope_index(
    input_ids: torch.Tensor,
    ids: TokenIds,
    attention_mask: torch.Tensor | None = None,
    image_grid_thw: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
    audio_feature_lengths: torch.Tensor | None = None,
    video_second_per_grid: torch.Tensor | None = None,
    use_audio_in_video: bool = False,
    spatial_merge_size: int = 2,
    position_id_per_seconds: float = 13,
    n_window: int = 50,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3-Omni TMRoPE position ids ``[3, B, T]`` (float32) and rope deltas ``[B, 1]`` (float32).

    See the notes above for how this differs from :func:`rope_index`. Worked example (one image of
    2×4 patches = 1×2 merged tokens after two text tokens)::

        tokens : T  T  <vision_start> I  I  <vision_end> T
        time   : 0  1  2              3  3  5            6
        height : 0  1  2              3  3  5            6
        width  : 0  1  2              3  4  5            6
        rope delta = (max position + 1) - number of tokens = 7 - 7 = 0

    (<vision_end> starts after the image's largest position, 4, in any component).
    """
    batch, seq = input_ids.shape
    device = input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    mask = attention_mask.bool().cpu()
    has_grid = image_grid_thw is not None or video_grid_thw is not None
    if not has_grid:
        pos = attention_mask.float().cumsum(-1) - 1
        pos = pos.masked_fill(attention_mask == 0, 1)
        deltas = pos.max(-1, keepdim=True).values + 1 - attention_mask.sum(-1, keepdim=True)
        return pos.unsqueeze(0).expand(3, -1, -1).to(device), deltas.float().to(device)
    position_ids = torch.zeros(3, batch, seq, dtype=torch.float32)
    image_grids = image_grid_thw.tolist() if image_grid_thw is not None else []
    video_grids = video_grid_thw.tolist() if video_grid_thw is not None else []
    audio_lens = audio_feature_lengths.tolist() if audio_feature_lengths is not None else []
    spg = video_second_per_grid.float().tolist() if video_second_per_grid is not None else [1.0] * len(video_grids)
    counters = {"image": 0, "video": 0, "audio": 0}
    deltas = []
    for b in range(batch):
        tokens = input_ids[b].cpu()[mask[b]].tolist()
        try:
            pos = _qwen3_row_positions(
                tokens, ids, image_grids, video_grids, audio_lens, spg, counters, use_audio_in_video,
                spatial_merge_size, position_id_per_seconds, n_window,
            )
        except IndexError:
            pos = None
        if pos is None or pos.shape[1] != len(tokens):
            raise ValueError(
                f"row {b}: placeholder tokens do not match the media (grids / audio lengths); was the input "
                "built by the Qwen3-Omni processor?"
            )
        position_ids[:, b, mask[b]] = pos
        deltas.append(float(pos.max()) + 1 - len(tokens) if len(tokens) else 0.0)
    return position_ids.to(device), torch.tensor(deltas, dtype=torch.float32, device=device).unsqueeze(1)
