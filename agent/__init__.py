"""Edge vision agent: frames in, int8 TFLite inference on the device, results out over MQTT or Greengrass IPC."""

import os

__version__ = "0.1.0"

# OpenCV and FFmpeg write warnings straight to stderr (a corrupt MJPEG frame, a camera probe). The agent
# counts skipped frames in its metrics and reports real failures as one line, so keep them quiet unless
# the user asked for their logs. (libjpeg, which decodes MJPG files, still names a corrupt frame in one
# "Corrupt JPEG data" line of its own: it has no switch.)
os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
