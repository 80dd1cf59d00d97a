"""Word lists kept apart from the code that reads them: the words tiny-random's tokenizer holds as
whole tokens, and the name fragments that mark a few-step (distilled) model."""
from __future__ import annotations

# Whole-word tokens of tiny-random's tokenizer (random_text.tiny_tokenizer): everyday English and
# the words of image prompts, including every word of the shipped scenes (scenes/*.yaml), so a
# prompt costs about as many tokens as in SD2's CLIP BPE (one per common word). Lowercase ASCII.
TOKENIZER_WORDS = tuple(sorted(set("""
a an the this that these those some any every each all both no not and or but nor so yet than then
of in on at to from by with without into onto over under above below behind between among through
across along around beside near far inside outside up down off out about against toward towards
before after during until while since upon within beyond beneath underneath past via like as if
i me my you your he him his she her it its we us our they them their who whom whose which what
where when why how there here very more most less least much many few little lots several other
another such own same only just also too even still again ever never always often sometimes
is are was were be been being am has have had having do does did done can could will would shall
should may might must make makes made get gets got go goes went come comes came see seen look
looks looking show shows shown hold holds holding stand standing sit sitting lie lying walk walking
run running fly flying swim swimming float floating grow growing fall falling rise rising shine
shining glow glowing reflect reflecting wear wearing ride riding play playing read reading eat
eating
drink drinking sleep sleeping smile smiling cast casting paint painted painting draw drawn drawing
render rendered rendering photograph photographed photographing shot shoot lit cover covered
filled surrounded made seen viewed framed carved woven built broken scattered hanging stacked
one two three four five six seven eight nine ten hundred thousand first second third single double
half quarter dozen pair group crowd
red orange yellow green blue purple violet pink brown black white grey gray silver gold golden
beige cream ivory teal cyan magenta turquoise navy maroon crimson scarlet amber emerald indigo
lavender olive tan bronze copper rust pastel neon colour color colours colors colourful colorful
monochrome vivid vibrant muted saturated desaturated dark darker light lighter bright brighter pale
deep rich warm cool cold hot soft hard smooth rough sharp blurry blurred blur clear clean dirty
big small large tiny huge giant massive little tall short long wide narrow thin thick flat round
square tall high low heavy empty full open closed old new young ancient modern vintage retro
antique classic futuristic medieval gothic baroque victorian rustic ornate minimal minimalist simple
complex elegant beautiful pretty ugly cute lovely gorgeous stunning epic dramatic moody calm quiet
peaceful serene busy crowded lonely abandoned ruined broken cozy cosy comfortable friendly happy
sad angry scary dreamy magical mystical mysterious fantasy surreal realistic photorealistic hyper
detailed intricate highly ultra extremely very quality best good bad fine great perfect wet dry
fresh wild strange sunny cloudy rainy foggy misty snowy stormy windy frozen icy dusty hazy shiny
glossy matte metallic wooden glass stone marble brick concrete steel iron plastic paper leather silk
velvet cotton wool linen lace fur feather feathers striped dotted spotted checkered patterned plain
distant nearby hidden floating glowing burning melting reflective transparent translucent
person people man men woman women boy girl child children baby kid kids family friend friends
face faces eye eyes hair hand hands arm arms leg legs foot feet head body skin lips nose ear smile
portrait figure crowd king queen prince princess knight soldier warrior wizard witch angel robot
astronaut pilot sailor farmer chef doctor artist painter musician dancer student teacher monk
dog dogs cat cats puppy kitten horse horses cow sheep pig goat bird birds eagle owl parrot duck
swan chicken fish whale dolphin shark octopus turtle frog snake lizard dragon bear wolf fox deer
rabbit mouse lion tiger elephant giraffe zebra monkey butterfly bee insect spider retriever poodle
tree trees forest woods jungle flower flowers rose roses tulip sunflower lily daisy grass leaf
leaves branch branches plant plants houseplant garden bush moss vine vines mushroom cactus palm
pine oak willow bamboo fern ivy
sky skies cloud clouds sun sunlight moon moonlight star stars starry galaxy planet space universe
rain snow fog mist storm thunder lightning rainbow wind weather sunset sunrise dawn dusk twilight
morning noon afternoon evening night midnight day daytime nighttime summer winter spring autumn
season hour
mountain mountains hill hills valley canyon cliff cliffs rock rocks desert dune dunes beach coast
shore sea ocean wave waves lake lakes river rivers stream waterfall pond island islands bay harbour
harbor port field fields meadow farm countryside landscape seascape cityscape scenery horizon
glacier volcano cave ground earth sand water ice fire smoke dust mud lava swamp marsh dolomites
alps
city cities town village street streets road roads alley square market bridge tower towers castle
palace temple church cathedral house houses home building buildings skyscraper skyline cottage
cabin barn hut tent ruins wall walls roof window windows door doors gate fence stairs staircase
floor ceiling room rooms kitchen bedroom bathroom hall hallway office library museum gallery
restaurant cafe bar shop store station train tram bus car cars truck bike bicycle boat boats ship
ships sailing sail yacht plane airplane rocket subway lighthouse fountain statue monument park
playground school hospital factory warehouse interior exterior living dining
table chair chairs sofa couch bed lamp lamps candle candles mirror clock shelf shelves bookshelf
book books cup mug glass bottle vase pot plate bowl spoon knife fork basket box bag suitcase
umbrella hat cap dress shirt coat jacket shoes boots scarf glasses ring necklace crown sword shield
armor armour helmet mask flag rug carpet curtain curtains pillow pillows blanket painting paintings
picture frame poster sign screen computer phone camera television radio guitar piano violin drum
ball toy doll kite balloon balloons wheel key map letter terracotta ceramic porcelain
food bread cake pie apple apples orange oranges banana lemon cherry strawberry grapes fruit fruits
vegetable vegetables tomato salad soup pizza coffee tea wine beer juice milk cheese egg eggs
chocolate candy honey
photo photograph photography picture image art artwork illustration drawing sketch painting
watercolor watercolour oil acrylic ink pencil charcoal pastel canvas mural fresco mosaic poster
cartoon anime manga comic render cgi digital concept matte style styled studio impressionism
impressionist expressionism expressionist cubism cubist surrealism realism abstract pop renaissance
ukiyo art nouveau deco van gogh monet picasso rembrandt vermeer da vinci dali hokusai klimt
turner starry brush brushes strokes stroke swirling swirl swirls texture textured thick impasto
palette knife lineart outline cinematic cinema film movie still frame scene shot composition
closeup close wide angle lens telephoto macro fisheye aerial drone view views overhead panorama
panoramic degree degrees symmetrical symmetry centered portrait landscape bokeh depth focus
focused unfocused exposure aperture shutter iso mm dslr analog polaroid kodak fujifilm grain grainy
noise noisy sharpness resolution hd uhd megapixel
lighting light lights lamp glow shadow shadows shade silhouette backlit backlight rim ambient
natural volumetric rays beam beams sunbeam spotlight neon hour golden blue studio soft harsh
diffuse diffused dramatic contrast low key reflections reflection highlights exposure overexposed
underexposed lowres jpeg artifacts watermark text signature logo cropped deformed disfigured
distorted mutated extra missing bad anatomy duplicate worst normal poorly drawn out frame
ugly tiling morbid cut blank error fingers limbs background foreground middle center centre left
right top bottom side corner edge front back middle
beautiful trending artstation unreal engine octane masterpiece award winning professional
amateur official detailed rendering sharp focus
majestic lush tropical lagoon cascading crystal alpine lantern lanterns firefly fireflies whimsical
elderly craftsman
workshop marketplace spices fabric fabrics merchant merchants samurai ninja cyberpunk steampunk
aesthetic puddle puddles
hyperrealistic trend airship rooftop rooftops overgrown cloudscape thunderstorm fisherman fishermen
net nets sculpture sculptures
cluttered bustling snowcapped peak peaks reflected illuminated glittering sparkling shimmering
gleaming radiant luminous ethereal
celestial cosmic nebula aurora borealis meteor comet eclipse horizon orbit spaceship spacecraft
alien aliens
creature creatures monster monsters beast giant elf elves dwarf fairy fairies mermaid unicorn
phoenix
griffin goblin orc vampire zombie ghost skeleton skull demon god goddess hero heroine villain
empire kingdom village villager traveler traveller wanderer explorer adventurer hunter archer ruins
temple shrine
pagoda mosque tomb pyramid pyramids colosseum arch arches column columns pillar pillars dome vault
balcony terrace courtyard porch attic basement cellar corridor tunnel dungeon throne chandelier
fireplace hearth
bookcase desk armchair cushion cushions quilt wallpaper tiles tile wood timber plank planks log
logs pebble pebbles boulder boulders gravel crystal crystals gem gems jewel jewels diamond diamonds
pearl pearls ruby sapphire treasure coin coins chest sweater hoodie jeans skirt gown robe
cloak kimono uniform suit tie belt gloves apron veil beard mustache freckles tattoo tattoos
makeup lipstick curly wavy straight braid braids ponytail blonde brunette redhead bald smiling
laughing
crying screaming thinking dreaming gazing staring posing dancing singing fighting jumping climbing
sailing fishing
cooking painting writing rainforest savanna tundra prairie orchard vineyard grove thicket clearing
creek brook
estuary delta reef coral seaweed kelp shell shells sandcastle pier dock wharf boardwalk promenade
cove fjord archipelago peninsula plateau ridge summit slope slopes crater geyser hot spring springs
oasis blossom blossoms cherry petal petals bloom blooming orchid poppy poppies lotus maple birch
cedar cypress redwood sequoia autumnal foliage hedge hedges lawn flowerbed greenhouse neighborhood
neighbourhood suburb
downtown boulevard avenue highway freeway intersection crosswalk sidewalk pavement lamppost
streetlight billboard storefront shopfront
signage graffiti rooftop apartment balcony penthouse mansion villa chalet bungalow farmhouse
windmill mill barnyard
stable cinematography editorial fashion magazine cover advertisement product packshot commercial
documentary journalism candid snapshot
selfie headshot fullbody closeup cutaway blueprint diagram isometric orthographic perspective
vanishing point wireframe lowpoly
voxel pixel pixelated sculpted clay claymation stopmotion origami papercut collage stencil engraving
etching woodcut
lithograph screenprint tapestry embroidery stained enamel filigree calligraphy photorealism
hyperrealism naturalism romanticism rococo neoclassical
symbolism pointillism fauvism bauhaus brutalist brutalism artdeco memphis vaporwave synthwave
solarpunk dieselpunk gothic noir
sepia duotone halftone infrared thermal xray ultraviolet longexposure timelapse tiltshift volumetric
godrays caustics subsurface
scattering raytracing global illumination ambient occlusion specular diffuse glossy roughness
refraction translucency iridescent holographic
opalescent morning evening tonight yesterday today tomorrow ago early late
""".split())))

# What CLIP's pre-tokenizer splits off a word ("gogh's" -> gogh, 's): whole tokens too.
CLIP_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
