"""embedforge.distill"""
