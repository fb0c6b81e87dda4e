"""embedforge.convert"""
