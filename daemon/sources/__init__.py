"""Camera sources: one reader thread per camera pushing Frame / EndOfStream into a sink.

``replay`` (video file or JPEG folder as an MJPEG camera), ``mjpeg`` (HTTP multipart or snapshot cameras),
``av`` (RTSP and video files decoded by PyAV). ``base`` holds what they share; ``backoff`` the pure helpers.
"""
