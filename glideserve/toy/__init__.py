"""The bundled toy task: procedural shape images, their judge, and the recipe that trains glide-small / glide-tiny."""
