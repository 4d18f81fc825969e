# A tiny stand-in for the authors' tools/audioset/__init__.py (same two dicts, few classes), written for the tests.
category_info = {
    'Musical instrument': ['Banjo', 'Harp'],
    'Human sounds': ['Whistling', 'Chuckle, chortle'],
    'Animal': ['Bark', 'Meow'],
    'Vehicle&Engine': ['Car alarm'],
    'Domestic sounds, home sounds': ['Doorbell'],
    'Natural sounds': ['Thunder'],
    'Mechanisms&Tools&Alarm': ['Clock', 'Hammer'],
}

category_2_simple = {
    'Musical instrument': 'music',
    'Human sounds': 'human',
    'Animal': 'animal',
    'Vehicle&Engine': 'vehicle',
    'Domestic sounds, home sounds': 'home',
    'Natural sounds': 'nature',
    'Mechanisms&Tools&Alarm': 'others',
}
