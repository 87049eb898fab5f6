"""Video keyframe indexing: decode with PyAV, pick keyframes by scene change, index them as images."""
