"""FaceAge: face-age estimation library."""
