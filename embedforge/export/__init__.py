"""embedforge.export"""
