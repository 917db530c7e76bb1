"""The words of the generated sample data: its colours and shapes, in English and Chinese.

The generators (``vlp.data.synthetic`` for images, ``vlp.data.synthetic_video`` for clips) draw and
caption with these; evaluations that ask about the sample data's content (the default answer
vocabulary of ``vlp.eval.video_qa``) read them here, so no evaluation imports a generator. A new colour
or shape goes here (a colour with the RGB it is drawn in); how a caption is worded (sizes, places,
motions) stays with its generator.
"""

from __future__ import annotations

COLOURS = {
    "red": ((220, 30, 30), "红色"),
    "green": ((30, 170, 60), "绿色"),
    "blue": ((30, 60, 220), "蓝色"),
    "yellow": ((235, 200, 20), "黄色"),
    "purple": ((140, 40, 170), "紫色"),
    "orange": ((245, 130, 20), "橙色"),
    "black": ((20, 20, 20), "黑色"),
    "cyan": ((20, 200, 210), "青色"),
}
SHAPES = {"circle": "圆形", "square": "正方形", "triangle": "三角形", "star": "星形",
          "ring": "圆环", "cross": "十字"}

# Colours and shapes that stay distinct from each other and from the background after 4:2:0 chroma
# subsampling at 64x64 (orange and cyan blur into red and blue), and whose motion changes the grey
# level enough for the curation's motion score (``vlp.curation.video.motion_score``, a median of
# frame-to-frame grey changes) to tell every clip from a still: yellow is nearly as bright as the
# background, and thin shapes (star, ring) cover too little of the frame to show a fade.
VIDEO_COLOURS = ("red", "green", "blue", "purple", "black")
VIDEO_SHAPES = ("circle", "square", "triangle", "cross")
